//! The WHERE/ORDER/LIMIT tails of list queries, the same SQL on both backends.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{DeliveryFilter, EventFilter};

pub(crate) fn push_event_filter<'a, DB>(query: &mut QueryBuilder<'a, DB>, filter: &EventFilter)
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    &'static str: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    query.push(" WHERE TRUE");
    if let Some(status) = filter.status {
        query
            .push(" AND event_status = ")
            .push_bind(status.as_str());
    }
    if let Some(event_type) = &filter.event_type {
        query
            .push(" AND event_type = ")
            .push_bind(event_type.clone());
    }
    if let Some((entity_type, entity_id)) = &filter.entity {
        query
            .push(" AND entity_type = ")
            .push_bind(entity_type.clone())
            .push(" AND entity_id = ")
            .push_bind(entity_id.clone());
    }
    if let Some(before) = filter.before_id {
        query.push(" AND event_id < ").push_bind(before);
    }
    query.push(if filter.oldest_first {
        " ORDER BY event_id ASC"
    } else {
        " ORDER BY event_id DESC"
    });
    query.push(" LIMIT ").push_bind(limit(filter.limit));
}

pub(crate) fn push_delivery_filter<'a, DB>(
    query: &mut QueryBuilder<'a, DB>,
    filter: &DeliveryFilter,
) where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    query.push(" WHERE TRUE");
    if let Some(status) = filter.status {
        // A literal (one of the statuses' fixed names), not a parameter: SQLite reads the
        // index of dead letters or of retries only for a query that names its status.
        query.push(format_args!(" AND status = '{}'", status.as_str()));
    }
    if let Some(route) = &filter.route {
        query.push(" AND route = ").push_bind(route.clone());
    }
    query
        .push(" ORDER BY delivery_id LIMIT ")
        .push_bind(limit(filter.limit));
}

/// Zero means "no limit" to callers that built a filter with `Default`.
fn limit(limit: u32) -> i64 {
    if limit == 0 {
        i64::MAX
    } else {
        i64::from(limit)
    }
}

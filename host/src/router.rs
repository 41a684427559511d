//! Which routes an event goes to: `event_type` globs and an optional `event_target`.

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::store::{EventHead, RoutePlan};

/// How one route selects events.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub route: String,
    /// Globs over `event_type`; `*` matches across dots (`order.*` matches `order.created.v2`).
    pub event_types: Vec<String>,
    /// When set, only events addressed to this target match.
    pub target: Option<String>,
    pub ordered: bool,
}

struct CompiledRoute {
    types: GlobSet,
    target: Option<String>,
    plan: RoutePlan,
}

/// The route table, in configuration order.
pub struct Router {
    routes: Vec<CompiledRoute>,
}

#[derive(Debug, thiserror::Error)]
#[error("route '{route}': invalid event_types pattern '{pattern}': {reason}")]
pub struct RouterError {
    pub route: String,
    pub pattern: String,
    pub reason: String,
}

impl Router {
    pub fn new(matches: &[RouteMatch]) -> Result<Self, RouterError> {
        let mut routes = Vec::with_capacity(matches.len());
        for spec in matches {
            let mut builder = GlobSetBuilder::new();
            for pattern in &spec.event_types {
                let glob = Glob::new(pattern).map_err(|err| RouterError {
                    route: spec.route.clone(),
                    pattern: pattern.clone(),
                    reason: err.kind().to_string(),
                })?;
                builder.add(glob);
            }
            let types = builder.build().map_err(|err| RouterError {
                route: spec.route.clone(),
                pattern: spec.event_types.join(", "),
                reason: err.to_string(),
            })?;
            routes.push(CompiledRoute {
                types,
                target: spec.target.clone(),
                plan: RoutePlan {
                    route: spec.route.clone(),
                    ordered: spec.ordered,
                },
            });
        }
        Ok(Router { routes })
    }

    /// Every route the event fans out to; empty means the event is SKIPPED.
    pub fn plans_for(&self, head: &EventHead) -> Vec<RoutePlan> {
        self.routes
            .iter()
            .filter(|r| r.types.is_match(&head.event_type))
            .filter(|r| r.target.is_none() || r.target == head.event_target)
            .map(|r| r.plan.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(event_type: &str, target: Option<&str>) -> EventHead {
        EventHead {
            event_id: 1,
            event_type: event_type.into(),
            event_target: target.map(String::from),
            entity_type: "order".into(),
            entity_id: "1".into(),
        }
    }

    fn routes(plans: Vec<RoutePlan>) -> Vec<String> {
        plans.into_iter().map(|p| p.route).collect()
    }

    #[test]
    fn globs_targets_and_fan_out() {
        let router = Router::new(&[
            RouteMatch {
                route: "hooks".into(),
                event_types: vec!["order.*".into()],
                target: None,
                ordered: true,
            },
            RouteMatch {
                route: "billing".into(),
                event_types: vec!["order.paid".into(), "invoice.*".into()],
                target: Some("billing".into()),
                ordered: false,
            },
        ])
        .expect("valid routes");
        assert_eq!(
            routes(router.plans_for(&head("order.created.v2", None))),
            ["hooks"]
        );
        assert_eq!(
            routes(router.plans_for(&head("order.paid", Some("billing")))),
            ["hooks", "billing"]
        );
        assert_eq!(
            routes(router.plans_for(&head("order.paid", Some("crm")))),
            ["hooks"]
        );
        assert!(router.plans_for(&head("user.created", None)).is_empty());
    }

    #[test]
    fn a_bad_pattern_names_route_and_pattern() {
        let err = Router::new(&[RouteMatch {
            route: "r".into(),
            event_types: vec!["order.[".into()],
            target: None,
            ordered: true,
        }])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.starts_with("route 'r': invalid event_types pattern 'order.['"),
            "{err}"
        );
    }
}

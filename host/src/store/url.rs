use std::path::PathBuf;

use super::StoreError;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(StoreError::UnsupportedUrl(url.to_string()));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// The URL with any password replaced, fit for errors and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_string()
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_backends() {
        assert_eq!(
            StoreUrl::parse("sqlite://data/herald.db").ok(),
            Some(StoreUrl::Sqlite("data/herald.db".into()))
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///var/lib/herald.db").ok(),
            Some(StoreUrl::Sqlite("/var/lib/herald.db".into()))
        );
        assert!(matches!(
            StoreUrl::parse("postgresql://u@h/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!(StoreUrl::parse("mysql://h/db").is_err());
        assert!(StoreUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/events"),
            "postgres://app:***@db:5432/events"
        );
        assert_eq!(
            redact_url("postgres://app@db/events"),
            "postgres://app@db/events"
        );
        assert!(!StoreUrl::parse("mysql://u:s3cret@h/db")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("s3cret"));
    }
}

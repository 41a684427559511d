//! Turning what a user types or pipes in into [`NewEvent`]s, with errors that say which
//! flag or which stdin line is wrong.

use std::io::BufRead;

use anyhow::{anyhow, Context as _};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::store::NewEvent;

/// One line of `herald events append --stdin`: the `NewEvent` fields, with short aliases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    #[serde(alias = "type")]
    event_type: String,
    entity_type: String,
    #[serde(deserialize_with = "string_or_integer")]
    entity_id: String,
    #[serde(alias = "data")]
    event_data: Value,
    #[serde(default, alias = "target")]
    event_target: Option<String>,
    #[serde(default, alias = "key")]
    idempotency_key: Option<String>,
    #[serde(default)]
    headers: Option<Map<String, Value>>,
}

/// Entity ids are text in the store, but `"entity_id": 42` is what people write.
fn string_or_integer<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Integer(i64),
    }
    match Id::deserialize(deserializer) {
        Ok(Id::Text(text)) => Ok(text),
        Ok(Id::Integer(number)) => Ok(number.to_string()),
        Err(_) => Err(serde::de::Error::custom(
            "entity_id must be a string or an integer",
        )),
    }
}

impl EventLine {
    fn into_new_event(self) -> Result<NewEvent, String> {
        require_text("event_type", &self.event_type)?;
        require_text("entity_type", &self.entity_type)?;
        require_text("entity_id", &self.entity_id)?;
        Ok(NewEvent {
            event_type: self.event_type,
            entity_type: self.entity_type,
            entity_id: self.entity_id,
            event_data: self.event_data,
            event_target: self.event_target,
            idempotency_key: self.idempotency_key,
            headers: self.headers,
        })
    }
}

fn require_text(name: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        Err(format!("{name} is empty"))
    } else {
        Ok(())
    }
}

/// The event described by `herald events append` flags.
pub struct EventFlags<'a> {
    pub event_type: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    pub data: &'a str,
    pub target: Option<&'a str>,
    pub key: Option<&'a str>,
    pub headers: &'a [(String, String)],
}

impl EventFlags<'_> {
    pub fn to_new_event(&self) -> anyhow::Result<NewEvent> {
        for (flag, value) in [
            ("--type", self.event_type),
            ("--entity-type", self.entity_type),
            ("--entity-id", self.entity_id),
        ] {
            require_text(flag, value).map_err(|message| anyhow!(message))?;
        }
        let event_data: Value = serde_json::from_str(self.data)
            .map_err(|err| anyhow!("--data is not valid JSON: {err}"))?;
        let headers = (!self.headers.is_empty()).then(|| {
            self.headers
                .iter()
                .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                .collect::<Map<_, _>>()
        });
        Ok(NewEvent {
            event_type: self.event_type.to_string(),
            entity_type: self.entity_type.to_string(),
            entity_id: self.entity_id.to_string(),
            event_data,
            event_target: self.target.map(str::to_string),
            idempotency_key: self.key.map(str::to_string),
            headers,
        })
    }
}

/// `--header NAME=VALUE`.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "expected NAME=VALUE, e.g. tenant=acme, got '{text}'"
        )),
    }
}

/// Events as JSON lines, one object per line; blank lines are skipped. The first bad line
/// fails the whole read, so a caller can append all or nothing.
pub fn read_event_lines(reader: impl BufRead) -> anyhow::Result<Vec<NewEvent>> {
    let mut events = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("cannot read stdin line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str::<EventLine>(&line)
            .map_err(|err| json_error_on_line(&err))
            .and_then(EventLine::into_new_event)
            .map_err(|message| anyhow!("stdin line {number}: {message}"))?;
        events.push(event);
    }
    Ok(events)
}

/// serde_json's message names "line 1" of the one line it saw; keep only the column.
fn json_error_on_line(err: &serde_json::Error) -> String {
    let message = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    match message.strip_suffix(&position) {
        Some(bare) => format!("{bare} (column {})", err.column()),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<NewEvent>, String> {
        read_event_lines(text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn lines_accept_full_names_aliases_and_blank_lines() {
        let events = read(
            "{\"event_type\":\"a\",\"entity_type\":\"order\",\"entity_id\":\"1\",\"event_data\":{}}\n\
             \n   \n\
             {\"type\":\"b\",\"entity_type\":\"order\",\"entity_id\":2,\"data\":[1],\
             \"target\":\"billing\",\"key\":\"k\",\"headers\":{\"tenant\":\"acme\"}}\n",
        )
        .expect("valid lines");
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].event_type, "b");
        assert_eq!(events[1].entity_id, "2");
        assert_eq!(events[1].event_target.as_deref(), Some("billing"));
        assert_eq!(events[1].idempotency_key.as_deref(), Some("k"));
        assert_eq!(events[1].event_data, serde_json::json!([1]));
    }

    #[test]
    fn bad_lines_are_numbered() {
        let good = r#"{"type":"a","entity_type":"o","entity_id":"1","data":{}}"#;
        let err = read(&format!("{good}\n\n{{bad\n"))
            .err()
            .unwrap_or_default();
        assert!(
            err.starts_with("stdin line 3: key must be a string (column 2)"),
            "{err}"
        );

        let err = read(r#"{"type":"a","entity_type":"o","entity_id":"1"}"#).err();
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("stdin line 1: missing field `event_data`"),
            "{err}"
        );

        let err = read(r#"{"type":"a","entity_type":"o","entity_id":"1","data":1,"x":1}"#).err();
        assert!(err.unwrap_or_default().contains("unknown field `x`"));

        let err = read(r#"{"type":"","entity_type":"o","entity_id":"1","data":1}"#).err();
        assert_eq!(err.as_deref(), Some("stdin line 1: event_type is empty"));
    }

    #[test]
    fn flags_reject_malformed_data_with_its_position() {
        let flags = EventFlags {
            event_type: "t",
            entity_type: "e",
            entity_id: "1",
            data: "{bad",
            target: None,
            key: None,
            headers: &[],
        };
        let err = flags.to_new_event().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("--data is not valid JSON: key must be a string at line 1 column 2")
        );
    }

    #[test]
    fn headers_need_a_name_and_an_equals_sign() {
        assert_eq!(
            parse_header("tenant=a=b"),
            Ok(("tenant".into(), "a=b".into()))
        );
        assert!(parse_header("tenant").is_err());
        assert!(parse_header("=x").is_err());
    }
}

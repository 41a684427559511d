//! Test plugin `http-loop`: POSTs to config `url` in a tight loop, ignoring every
//! answer, and never returns on its own, so the host's tests can check that one
//! attempt cannot turn into an unbounded stream of requests.

use herald_sdk::prelude::*;

struct HttpLoop;

impl Plugin for HttpLoop {
    fn describe() -> PluginInfo {
        PluginInfo::new("http-loop", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::required("url", "Where to send the requests."))
    }

    fn handle(event: Event) -> Outcome {
        let Ok(url) = config::require("url") else {
            return Outcome::dead("no url configured");
        };
        loop {
            let request = Request::post(&url).header("Idempotency-Key", &event.idempotency_key);
            let _ = http::send(request);
        }
    }
}

herald_sdk::export_plugin!(HttpLoop);

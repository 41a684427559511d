//! Test plugin `escape`: tries the ambient authority a plugin must not have (a file, an
//! environment variable, a socket) and reports what it got as its dead reason:
//!
//! `fs=<r>; env=<r>; net=<r>` where each `<r>` is `err(<message>)` or, if the sandbox
//! let it through, `DATA(<what it got>)`. The host's tests expect no `DATA`.

use herald_sdk::prelude::*;

struct Escape;

impl Plugin for Escape {
    fn describe() -> PluginInfo {
        PluginInfo::new("escape", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(_event: Event) -> Outcome {
        let fs = match std::fs::read("/etc/passwd") {
            Ok(bytes) => format!("DATA({} bytes)", bytes.len()),
            Err(err) => format!("err({err})"),
        };
        let env = match std::env::var("HOME") {
            Ok(home) => format!("DATA({home})"),
            Err(err) => format!("err({err})"),
        };
        let net = match std::net::TcpStream::connect("127.0.0.1:5432") {
            Ok(stream) => format!("DATA(connected to {:?})", stream.peer_addr().ok()),
            Err(err) => format!("err({err})"),
        };
        Outcome::dead(format!("fs={fs}; env={env}; net={net}"))
    }
}

herald_sdk::export_plugin!(Escape);

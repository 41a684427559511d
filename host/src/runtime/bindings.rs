//! Host-side bindings generated from the one WIT package plugins are built against.

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit",
    world: "plugin",
    // `http.send` may trap: past the per-call request limit the plugin is stopped rather
    // than told, since a plugin looping on it ignores what it is told.
    imports: {
        "herald:plugin/http.send": async | trappable,
        default: async,
    },
    exports: { default: async },
});

pub use self::herald::plugin::types::{ConfigKey, RetryRequest};
pub use self::herald::plugin::{config, emit, http, log};

//! Host-side bindings generated from the one WIT package plugins are built against.

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit",
    world: "plugin",
    imports: { default: async },
    exports: { default: async },
});

pub use self::herald::plugin::types::{ConfigKey, RetryRequest};
pub use self::herald::plugin::{config, emit, http, log};

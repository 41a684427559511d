//! Write Herald delivery plugins in Rust.
//!
//! A plugin is a WebAssembly component that Herald calls once per (event, route). It
//! answers with an [`Outcome`]: delivered, retry (maybe after a delay), dead, or skip.
//! It reaches the outside world only through the capabilities the route grants:
//! [`http`], [`emit`], [`log`] and [`config`]. Files, sockets, environment variables
//! and clocks are not available; the event carries the host's clock
//! ([`Event::now_ms`]).
//!
//! A plugin author writes one trait impl and one macro call:
//!
//! ```
//! use herald_sdk::prelude::*;
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn describe() -> PluginInfo {
//!         PluginInfo::new("hello", env!("CARGO_PKG_VERSION")).event_type("greeting.*")
//!     }
//!
//!     fn handle(event: Event) -> Outcome {
//!         log::info(format!("hello, {}", event.entity_id));
//!         Outcome::delivered()
//!     }
//! }
//!
//! herald_sdk::export_plugin!(Hello);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`).
//! The same code also builds natively, where the capabilities talk to
//! [`testing::Harness`] instead of a host, so `cargo test` needs no WebAssembly at all.
//!
//! Plugins never panic on bad input: a panic aborts the attempt as a trap, which the
//! host counts as a plugin fault (and repeated faults quarantine the plugin). Turn
//! input problems into [`Outcome::dead`] (permanent) or [`Outcome::retry`] (transient).

pub mod cloudevents;
pub mod config;
pub mod emit;
mod event;
pub mod http;
pub mod log;
mod outcome;
mod plugin;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod time;
pub mod webhooks;

#[cfg(target_arch = "wasm32")]
mod wasm;

pub use event::{DataError, Event};
pub use outcome::Outcome;
pub use plugin::{ConfigKey, Plugin, PluginInfo};

/// The host side of every capability: the component's imports on WebAssembly, the
/// thread-local test harness natively. Each capability module calls only this.
#[cfg(target_arch = "wasm32")]
use wasm as backend;

#[cfg(not(target_arch = "wasm32"))]
use testing::backend;

/// The bindings `wit-bindgen` generates from `wit/herald.wit`. Plugin code does not use
/// them directly; [`export_plugin!`] wires a [`Plugin`] to them.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        default_bindings_module: "herald_sdk::bindings",
    });
}

/// Glue for [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm::{describe, handle};
}

/// Everything a plugin usually needs: `use herald_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::emit::NewEvent;
    pub use crate::http::{HttpError, Request, Response};
    pub use crate::{config, emit, http, log};
    pub use crate::{ConfigKey, DataError, Event, Outcome, Plugin, PluginInfo};
}

/// Makes a [`Plugin`] the component's exports (`describe` and `handle`).
///
/// Call it once per crate, at the top level, with the name of the type that implements
/// [`Plugin`] (a plain name in scope, not a path). On native targets it only checks that the type is a plugin, so the crate
/// still builds for `cargo test`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ident) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            impl $crate::bindings::Guest for $plugin {
                fn describe() -> $crate::bindings::PluginInfo {
                    $crate::__private::describe::<$plugin>()
                }

                fn handle(event: $crate::bindings::Event) -> $crate::bindings::Outcome {
                    $crate::__private::handle::<$plugin>(event)
                }
            }

    $crate::bindings::export!($plugin with_types_in $crate::bindings);
        };

        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn assert_plugin<P: $crate::Plugin>() {}
            let _ = assert_plugin::<$plugin>;
        };
    };
}

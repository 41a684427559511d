//! Test plugin `stack-overflow`: recurses until the call stack is exhausted, so the
//! host's tests can check that a stack overflow is a trap of that attempt only.

use std::hint::black_box;

use herald_sdk::prelude::*;

struct StackOverflow;

/// Never returns normally. The recursive call goes through a function pointer the
/// compiler cannot see through, so it can neither inline the recursion nor turn it into
/// a loop; the addition after the call keeps every frame alive.
fn descend(depth: u64) -> u64 {
    let next: fn(u64) -> u64 = black_box(descend);
    next(depth + 1).wrapping_add(depth)
}

impl Plugin for StackOverflow {
    fn describe() -> PluginInfo {
        PluginInfo::new("stack-overflow", env!("CARGO_PKG_VERSION")).event_type("*")
    }

    fn handle(_event: Event) -> Outcome {
        Outcome::delivered_with(descend(0).to_string())
    }
}

herald_sdk::export_plugin!(StackOverflow);

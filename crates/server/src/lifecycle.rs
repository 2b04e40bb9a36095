//! The phases of a graceful shutdown, shared by the server loop, the run machinery and
//! every WebSocket connection. A leaf: tokens only, no state of any user.

use tokio_util::sync::CancellationToken;

/// Shutdown happens in three steps, each a token that fires once, in this order:
/// 1. `draining`: no new runs are accepted, readiness answers 503, open sockets get a
///    `server_shutdown` frame but stay open so they see their runs finish;
/// 2. `interrupt_runs`: after the grace period, runs still going end `interrupted`;
/// 3. `close_sockets`: once runs have written their terminal events, sockets close (1001).
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    pub draining: CancellationToken,
    pub interrupt_runs: CancellationToken,
    pub close_sockets: CancellationToken,
}

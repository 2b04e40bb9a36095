//! Storage: the `apex-store` crate under the paths the server has always used. The
//! user-scoped handle agents use, `UserStore`, is one layer up (`crate::user_store`).
//!
//! `apex-store` holds the role traits ([`Accounts`], [`Threads`], [`Runs`],
//! [`QueueSignals`], [`EventLog`], [`Usage`], [`Cluster`]; [`Store`] is all of them), their
//! records, and the SQLite and PostgreSQL engines; see its crate docs. Through
//! `dyn Store` every method is callable as it is; on a concrete store, a role's methods
//! need its trait in scope (`use crate::store::prelude::*`, or the trait by name).
//!
//! Application code does not call the user-data methods with a free-standing id: it goes
//! through `UserStore`, which can only be made from an authenticated user or a run's
//! context, and passes that user's id to every call. A thread, run or message of another
//! user is therefore indistinguishable from one that does not exist.

pub use apex_store::*;

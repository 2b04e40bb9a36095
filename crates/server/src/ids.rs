//! Validated id newtypes: they live in `apex-store` (stored rows carry them), re-exported
//! here so `crate::ids::...` names them as before.
pub use apex_store::ids::*;

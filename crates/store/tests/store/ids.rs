//! The id newtypes: what they accept from outside, and their round trips.

use apex_store::ids::{IdError, RunId, ThreadId, UserId};

#[test]
fn rejects_empty_and_placeholder_ids() {
    for raw in [
        "",
        "  ",
        "none",
        "NULL",
        "undefined",
        "0",
        "nil",
        "anonymous",
    ] {
        assert!(UserId::parse(raw).is_err(), "{raw:?} must be rejected");
    }
    assert_eq!(
        RunId::parse("00000000-0000-0000-0000-000000000000"),
        Err(IdError::Placeholder(
            "00000000-0000-0000-0000-000000000000".into()
        ))
    );
    assert_eq!(ThreadId::parse("my-thread"), Err(IdError::Malformed));
}

#[test]
fn round_trips_generated_ids() {
    let id = ThreadId::generate();
    assert_eq!(ThreadId::parse(&id.to_string()), Ok(id));
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(serde_json::from_str::<ThreadId>(&json).unwrap(), id);
}

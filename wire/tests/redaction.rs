//! Messages end up in errors and logs through `Debug`; a registration's secrets must not.

use d7q_wire::{Control, Register, TaskId};

#[test]
fn a_registration_debugs_without_query_or_header_values() {
    let reg = Register {
        task: TaskId([7; 16]),
        url: "https://s3.test/bucket/key?X-Amz-Signature=secret&X-Amz-Credential=AKIA".into(),
        headers: vec![("Authorization".into(), "Bearer secret-token".into())],
        digest: None,
        range: None,
    };
    for shown in [format!("{reg:?}"), format!("{:?}", Control::Register(reg))] {
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("AKIA"), "{shown}");
        assert!(shown.contains("https://s3.test/bucket/key?…"), "{shown}");
        assert!(shown.contains("Authorization"), "{shown}");
    }
}

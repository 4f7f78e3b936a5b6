//! The contracts' naming rule (see common.proto): the agent's ACP payloads
//! travel as `acp_*` strings, verbatim; everything else is typed. A new
//! `*_json` string, or a kind or state spelled as a string, fails here.

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Names that say "one of a fixed set": such a field is an enum or a oneof.
fn names_a_kind(field: &str) -> bool {
    ["kind", "kinds", "state", "stage", "role", "mode", "network", "restart"].contains(&field)
        || ["_kind", "_state", "_mode", "_policy"].iter().any(|s| field.ends_with(s))
}

fn check(message: &DescriptorProto, path: &str, broken: &mut Vec<String>) {
    let path = format!("{path}.{}", message.name());
    for field in &message.field {
        let name = field.name();
        let is_string = field.r#type() == Type::String;
        if name.ends_with("_json") {
            broken.push(format!("{path}.{name}: JSON in a string; type it, or name it acp_* if it is the agent's ACP payload"));
        }
        if is_string && names_a_kind(name) {
            broken.push(format!("{path}.{name}: a kind or state as a string; make it an enum or a oneof"));
        }
        if name.starts_with("acp_") && !is_string {
            broken.push(format!("{path}.{name}: acp_* fields carry the agent's JSON verbatim, as strings"));
        }
    }
    for nested in &message.nested_type {
        check(nested, &path, broken);
    }
}

#[test]
fn contracts_carry_no_untyped_json_and_no_string_kinds() {
    let set = FileDescriptorSet::decode(DESCRIPTORS).expect("the build wrote a descriptor set");
    let mut broken = Vec::new();
    let mut acp_fields = 0;
    for file in &set.file {
        for message in &file.message_type {
            check(message, file.package(), &mut broken);
            acp_fields += message.field.iter().filter(|f| f.name().starts_with("acp_")).count();
        }
    }
    assert!(broken.is_empty(), "contract naming rule broken:\n  {}", broken.join("\n  "));
    assert!(acp_fields > 5, "the check sees the acp_* fields ({acp_fields})");
}

#[test]
fn the_rule_catches_what_it_is_for() {
    let message = DescriptorProto {
        name: Some("Bad".into()),
        field: vec![
            prost_types::FieldDescriptorProto { name: Some("data_json".into()), r#type: Some(Type::String.into()), ..Default::default() },
            prost_types::FieldDescriptorProto { name: Some("kind".into()), r#type: Some(Type::String.into()), ..Default::default() },
            prost_types::FieldDescriptorProto { name: Some("acp_update".into()), r#type: Some(Type::Bytes.into()), ..Default::default() },
        ],
        ..Default::default()
    };
    let mut broken = Vec::new();
    check(&message, "test", &mut broken);
    assert_eq!(broken.len(), 3, "{broken:?}");
}

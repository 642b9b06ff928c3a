//! The Knative-shaped objects the tests load into the API server use upstream's field names and
//! types: each is checked against the openAPIV3Schema of the CRD in knative-serving v1.23.0
//! (`../shared/fixtures`, read where it is; skipped with a note where it is not).

use std::collections::BTreeMap;
use std::path::PathBuf;

use integration_tests::knative::{Revision, Target, knative_service, route};
use serde_json::Value;

fn crds() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/knative-serving-v1.23.0/crds");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipped: {} is not here", dir.display());
        None
    }
}

fn schema(dir: &std::path::Path, file: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Every field of `value` is declared by `schema` with a matching type, where the schema declares
/// fields (metadata is free-form in CRD schemas).
fn conforms(value: &Value, schema: &Value, path: &str) -> Result<(), String> {
    let declared = schema["type"].as_str();
    let fits = match (declared, value) {
        (None, _) => true,
        (Some("object"), Value::Object(_))
        | (Some("array"), Value::Array(_))
        | (Some("string"), Value::String(_))
        | (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("number"), Value::Number(_)) => true,
        _ => false,
    };
    if !fits && schema["x-kubernetes-int-or-string"] != Value::Bool(true) {
        return Err(format!("{path}: {value} is not {declared:?}"));
    }
    match value {
        Value::Object(fields) => {
            let Some(properties) = schema["properties"].as_object() else { return Ok(()) };
            for (key, field) in fields {
                let Some(field_schema) = properties.get(key) else {
                    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) {
                        continue;
                    }
                    return Err(format!("{path}.{key} is not a field the CRD declares"));
                };
                conforms(field, field_schema, &format!("{path}.{key}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| conforms(item, &schema["items"], &format!("{path}[{i}]")))
        }
        _ => Ok(()),
    }
}

#[test]
fn knative_objects_match_the_crd_schemas() {
    let Some(dir) = crds() else { return };
    let annotations: BTreeMap<String, String> =
        [("activator.knative.dev/sticky-session-header-name".to_owned(), "X-User".to_owned())].into();
    let mut revision = Revision::new("counter", "counter-00001");
    revision.annotations = annotations.clone();
    let traffic = [
        Target::new("counter-00001", 90),
        Target { revision: "counter-00002".into(), percent: Some(10), tag: Some("canary".into()) },
    ];
    for (object, file) in [
        (revision.to_json(), "revision.yaml"),
        (route("default", "counter", &traffic), "route.yaml"),
        (knative_service("default", "counter", &annotations), "service.yaml"),
    ] {
        conforms(&object, &schema(&dir, file), "$").unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let wrong = serde_json::json!({"spec": {"containerConcurrency": "many"}});
    assert!(conforms(&wrong, &schema(&dir, "revision.yaml"), "$").is_err(), "the check can fail");
}

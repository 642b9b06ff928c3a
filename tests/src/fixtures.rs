//! Upstream's YAML of knative-serving v1.23.0, read where it lies (`../shared/fixtures`, beside
//! the project), never copied into it: the activator's stock Deployment and RBAC that the
//! manifests patch, and the CRD schemas that Knative-shaped objects must fit.
//!
//! Where the fixtures are absent, the helpers print why a check is skipped and return `None`.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The fixtures' folder, if it is there.
pub fn dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/knative-serving-v1.23.0");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipped: the knative-serving fixtures are not at {}", dir.display());
        None
    }
}

/// Every document of a YAML file, as JSON values.
pub fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

/// The openAPIV3Schema of one of the fixtures' CRDs (`revision.yaml`, `route.yaml`, …).
pub fn crd_schema(file: &str) -> Option<Value> {
    let crd = documents(&dir()?.join("crds").join(file)).into_iter().next()?;
    Some(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
}

/// Every field of `value` is declared by `schema` with a matching type, where the schema declares
/// fields (metadata is free-form in CRD schemas).
pub fn conforms(value: &Value, schema: &Value, path: &str) -> Result<(), String> {
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

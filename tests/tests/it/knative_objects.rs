//! The Knative-shaped objects the tests load into the API server use upstream's field names and
//! types: each is checked against the openAPIV3Schema of the CRD in knative-serving v1.23.0
//! (`../shared/fixtures`, read where it is; skipped with a note where it is not).

use std::collections::BTreeMap;

use integration_tests::fixtures::{conforms, crd_schema};
use integration_tests::knative::{Revision, Target, knative_service, route};

#[test]
fn knative_objects_match_the_crd_schemas() {
    let Some(revision_schema) = crd_schema("revision.yaml") else { return };
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
        let schema = crd_schema(file).unwrap();
        conforms(&object, &schema, "$").unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let wrong = serde_json::json!({"spec": {"containerConcurrency": "many"}});
    assert!(conforms(&wrong, &revision_schema, "$").is_err(), "the check can fail");
}

//! What `manifests/` and the `Dockerfile` put into a cluster: every YAML document parses into its
//! typed object with no field the type lacks; the overlays build with `kubectl kustomize` against
//! upstream's unmodified activator objects and keep what knative-serving relies on; the RBAC we
//! add is exactly what Knative mode watches beyond upstream's; the image runs as a numeric user
//! with an exec-form entrypoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use activator::source::knative::WATCHED;
use integration_tests::fixtures::{self, conforms, crd_schema, documents};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The release the Knative overlay installs over, and the fixtures are of.
const SERVING_CORE: &str = "https://github.com/knative/serving/releases/download/knative-v1.23.0/serving-core.yaml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> PathBuf {
    root().join("manifests")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// A kustomization or component, as far as ours use kustomize's fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    components: Vec<String>,
    #[serde(default)]
    patches: Vec<PatchRef>,
    #[serde(default)]
    images: Vec<ImageRef>,
    #[serde(default)]
    config_map_generator: Vec<Generator>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
}

#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ImageRef {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_tag: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Generator {
    #[allow(dead_code)]
    name: String,
    files: Vec<String>,
    #[allow(dead_code)]
    options: Option<GeneratorOptions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GeneratorOptions {
    #[allow(dead_code)]
    disable_name_suffix_hash: Option<bool>,
    #[allow(dead_code)]
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The Knative Operator's `KnativeServing`, the fields our example sets (operator.knative.dev/v1beta1).
/// The Prometheus Operator's PodMonitor, as far as ours uses its fields (monitoring.coreos.com/v1).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PodMonitorSpec {
    namespace_selector: NamespaceSelector,
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
    honor_labels: bool,
}

/// The Prometheus Operator's PrometheusRule (monitoring.coreos.com/v1), alerting rules only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: RuleGroups,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroups {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RuleGroup {
    name: String,
    rules: Vec<AlertingRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct AlertingRule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    pending: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KnativeServing {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: KnativeServingSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KnativeServingSpec {
    version: Option<String>,
    registry: Option<Registry>,
    #[serde(default)]
    config: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    workloads: Vec<WorkloadOverride>,
    #[serde(default)]
    pod_disruption_budgets: Vec<PdbOverride>,
    #[serde(rename = "high-availability")]
    high_availability: Option<HighAvailability>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    #[serde(rename = "override", default)]
    images: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
#[serde(rename_all = "camelCase")]
struct WorkloadOverride {
    name: String,
    #[serde(default)]
    resources: Vec<ResourcesOverride>,
    #[serde(default)]
    env: Vec<EnvOverride>,
    #[serde(default)]
    topology_spread_constraints: Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ResourcesOverride {
    container: String,
    requests: Option<BTreeMap<String, Quantity>>,
    limits: Option<BTreeMap<String, Quantity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct EnvOverride {
    container: String,
    env_vars: Vec<EnvVar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PdbOverride {
    name: String,
    min_available: Option<IntOrString>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct HighAvailability {
    replicas: i32,
}

fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// The first place where `a` has something `b` lacks.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!("{path}.{k}")),
            Some(w) => first_difference(v, w, &format!("{path}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]")))
        }
        _ => (a != b).then(|| format!("{path}: {a} became {b}")),
    }
}

/// `doc` reads as a `T` and nothing of it is lost on the way: no unknown or misspelt field.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<(), String> {
    let object: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&object).unwrap();
    match first_difference(&without_nulls(doc), &back, "") {
        None => Ok(()),
        Some(place) => Err(format!("{place} is not a field of the type")),
    }
}

fn strict<T: DeserializeOwned>(doc: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(doc.clone()).map(drop).map_err(|e| e.to_string())
}

fn check_document(doc: &Value) -> Result<(), String> {
    let kind = (doc["apiVersion"].as_str().unwrap_or_default(), doc["kind"].as_str().unwrap_or_default());
    match kind {
        ("apps/v1", "Deployment") => typed::<Deployment>(doc),
        ("apps/v1", "StatefulSet") => typed::<StatefulSet>(doc),
        ("v1", "Service") => typed::<Service>(doc),
        ("v1", "ConfigMap") => typed::<ConfigMap>(doc),
        ("v1", "Namespace") => typed::<Namespace>(doc),
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(doc),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => typed::<HorizontalPodAutoscaler>(doc),
        ("policy/v1", "PodDisruptionBudget") => typed::<PodDisruptionBudget>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => typed::<ClusterRoleBinding>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => typed::<NetworkPolicy>(doc),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization") | ("kustomize.config.k8s.io/v1alpha1", "Component") => {
            strict::<Kustomization>(doc)
        }
        ("operator.knative.dev/v1beta1", "KnativeServing") => strict::<KnativeServing>(doc),
        ("monitoring.coreos.com/v1", "PodMonitor") => strict::<PodMonitor>(doc),
        ("monitoring.coreos.com/v1", "PrometheusRule") => strict::<PrometheusRule>(doc),
        ("serving.knative.dev/v1", "Service") => {
            if doc["metadata"]["name"].as_str().is_none_or(str::is_empty) {
                return Err("metadata.name is missing".into());
            }
            match crd_schema("service.yaml") {
                Some(schema) => conforms(doc, &schema, "$"),
                None => Ok(()),
            }
        }
        (api, kind) => Err(format!("{api} {kind} is a kind this test does not know: add its type")),
    }
}

#[test]
fn every_manifest_parses_into_its_typed_object() {
    let files = yaml_files(&manifests());
    assert!(files.len() >= 15, "{files:?}");
    let mut failures = Vec::new();
    for file in &files {
        for (i, doc) in documents(file).iter().enumerate() {
            if let Err(e) = check_document(doc) {
                failures.push(format!("{} (document {}): {e}", file.display(), i + 1));
            }
        }
        // What a kustomization names must be there.
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
            let k: Kustomization = serde_json::from_value(documents(file).remove(0)).unwrap();
            let dir = file.parent().unwrap();
            let local = k.resources.iter().chain(&k.components).filter(|r| !r.starts_with("https://"));
            let files = k.patches.iter().map(|p| &p.path).chain(k.config_map_generator.iter().flat_map(|g| &g.files));
            for path in local.chain(files) {
                if !dir.join(path).exists() {
                    failures.push(format!("{}: {path} does not exist", file.display()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    let operator: KnativeServing =
        serde_json::from_value(documents(&manifests().join("knative/operator/knative-serving.yaml")).remove(0))
            .unwrap();
    let image = operator.spec.registry.map(|r| r.images).unwrap_or_default().remove("activator");
    assert!(
        image.is_some_and(|i| i.contains("affinity-activator")),
        "the Operator example overrides the activator image"
    );

    // The check can fail: a misspelt field and a wrong type are both caught.
    let mut bad = documents(&manifests().join("knative/activator/hpa.yaml")).remove(0);
    bad["spec"]["minReplica"] = 2.into();
    assert!(check_document(&bad).unwrap_err().contains("minReplica"));
    let mut bad = documents(&manifests().join("knative/operator/knative-serving.yaml")).remove(0);
    bad["spec"]["workload"] = Value::Array(vec![]);
    assert!(check_document(&bad).is_err());
}

fn kubectl() -> bool {
    let found = Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: kubectl (with kustomize) is not installed; `just deps` installs it where it can");
    }
    found
}

fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect()
}

/// `to` relative to the directory `from` (kustomize takes no absolute roots).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in from.components().skip(common) {
        path.push(Component::ParentDir);
    }
    path.extend(to.components().skip(common));
    path
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the build"))
}

fn kustomization(dir: &Path) -> Kustomization {
    serde_json::from_value(documents(&dir.join("kustomization.yaml")).remove(0)).unwrap()
}

#[test]
fn the_redis_overlay_builds_offline() {
    if !kubectl() {
        return;
    }
    assert_eq!(kustomization(&manifests().join("redis")).namespace.as_deref(), Some("knative-serving"));
    let objects = kustomize(&manifests().join("redis"));
    assert!(objects.iter().all(|o| o["metadata"]["namespace"] == "knative-serving"), "everything in knative-serving");
    let redis = find(&objects, "StatefulSet", "affinity-activator-redis");
    let config =
        objects.iter().find(|o| o["kind"] == "ConfigMap").expect("the generated redis.conf")["metadata"]["name"]
            .clone();
    let volumes = redis["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    assert!(volumes.iter().any(|v| v["configMap"]["name"] == config), "the StatefulSet mounts the generated {config}");
    let data = &objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap()["data"]["redis.conf"];
    for line in ["maxmemory-policy allkeys-lru", "maxmemory "] {
        assert!(data.as_str().unwrap().contains(line), "{line}");
    }
    assert!(objects.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
    // The StatefulSet is governed by a headless Service; clients use the other one.
    let governing = redis["spec"]["serviceName"].as_str().unwrap();
    assert_eq!(find(&objects, "Service", governing)["spec"]["clusterIP"], "None");
    assert!(find(&objects, "Service", "affinity-activator-redis")["spec"]["clusterIP"].is_null());
    // The password reaches Redis through a file, never an argument `ps` would show.
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    let started = format!("{} {}", container["command"], container["args"]);
    assert!(!started.contains("--requirepass") && !started.contains("$(REDIS_PASSWORD)"), "{started}");
    assert!(data.as_str().unwrap().contains("include /run/redis/auth.conf"), "redis.conf reads the password file");
    // Room under the memory limit for the fork of an AOF rewrite.
    let maxmemory = data.as_str().unwrap().lines().find_map(|l| l.strip_prefix("maxmemory ")).unwrap();
    let limit = container["resources"]["limits"]["memory"].as_str().unwrap();
    assert_eq!((maxmemory, limit), ("256mb", "512Mi"), "half the limit");
    let policy = find(&objects, "NetworkPolicy", "affinity-activator-redis");
    assert_eq!(policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"], "activator");
}

#[test]
fn the_knative_overlay_keeps_upstreams_activator_and_sets_ours() {
    if !kubectl() {
        return;
    }
    let Some(fixtures) = fixtures::dir() else { return };
    let objects = composed(&fixtures, &[]);

    let stock = documents(&fixtures.join("activator.yaml"));
    let stock = find(&stock, "Deployment", "activator");
    let ours = find(&objects, "Deployment", "activator");
    assert_eq!(ours["metadata"]["namespace"], "knative-serving");
    assert_eq!(ours["spec"]["selector"], stock["spec"]["selector"], "the selector is immutable");
    assert_eq!(ours["spec"]["template"]["metadata"]["labels"], stock["spec"]["template"]["metadata"]["labels"]);
    let (pod, stock_pod) = (&ours["spec"]["template"]["spec"], &stock["spec"]["template"]["spec"]);
    assert_eq!(pod["serviceAccountName"], "activator");
    assert_eq!(pod["terminationGracePeriodSeconds"], 600);
    assert_eq!(pod["affinity"], stock_pod["affinity"], "upstream's anti-affinity stays");
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let (container, stock_container) = (&containers[0], &stock_pod["containers"][0]);
    assert_eq!(container["name"], "activator", "knative-serving and kubectl set image name it");
    assert_eq!(container["image"], "affinity-activator:dev");
    let ports: BTreeSet<i64> =
        container["ports"].as_array().unwrap().iter().filter_map(|p| p["containerPort"].as_i64()).collect();
    assert!([8012, 8013, 9090].iter().all(|p| ports.contains(p)), "{ports:?}");
    assert_eq!(container["ports"], stock_container["ports"]);
    assert_eq!(container["readinessProbe"], stock_container["readinessProbe"]);
    assert_eq!(container["livenessProbe"], stock_container["livenessProbe"]);
    assert_eq!(container["securityContext"], stock_container["securityContext"]);
    let env = |name: &str| container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    for upstream in ["POD_NAME", "POD_IP", "SYSTEM_NAMESPACE"] {
        assert!(env(upstream).is_some(), "{upstream} stays");
    }
    let redis_url = env("REDIS_URL").expect("REDIS_URL");
    assert_eq!(redis_url["valueFrom"]["secretKeyRef"]["name"], "affinity-activator-redis");
    assert_eq!(env("ACTIVATOR_PIN_STORE").unwrap()["value"], "redis");
    assert!(container["resources"]["limits"]["memory"].is_string());

    // The Redis the Secret points at admits these pods, and uses the same Secret.
    let redis = find(&objects, "StatefulSet", "affinity-activator-redis");
    let redis_env = &redis["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(redis_env[0]["valueFrom"]["secretKeyRef"]["name"], "affinity-activator-redis");
    let admitted = &find(&objects, "NetworkPolicy", "affinity-activator-redis")["spec"]["ingress"][0]["from"][0];
    for (k, v) in admitted["podSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&ours["spec"]["template"]["metadata"]["labels"][k], v, "the activator pods carry {k}");
    }

    let hpa = find(&objects, "HorizontalPodAutoscaler", "activator");
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert!(hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"].as_i64() > Some(0));
    let pdb = find(&objects, "PodDisruptionBudget", "activator-pdb");
    assert_eq!((pdb["spec"].get("minAvailable"), &pdb["spec"]["maxUnavailable"]), (None, &Value::from(1)));
    let autoscaler = find(&objects, "ConfigMap", "config-autoscaler");
    assert_eq!(autoscaler["data"]["target-burst-capacity"], "-1");
    assert!(autoscaler["data"]["_example"].is_string(), "upstream's keys stay");
    find(&objects, "ClusterRole", "affinity-activator");
    find(&objects, "ClusterRole", "knative-serving-activator-cluster");
}

/// The overlay users apply installs over the release; here, the same composition over upstream's
/// unmodified activator objects, with the optional `components` of `knative/` added after ours.
fn composed(fixtures: &Path, optional: &[&str]) -> Vec<Value> {
    let top = kustomization(&manifests());
    let knative = kustomization(&manifests().join("knative"));
    assert_eq!(knative.resources, [SERVING_CORE], "the Knative overlay installs over upstream's release");
    assert_eq!(top.resources, ["knative", "redis"]);

    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let files = ["activator.yaml", "activator-hpa.yaml", "activator-roles.yaml", "200-serviceaccount.yaml"];
    for file in files {
        std::fs::copy(fixtures.join(file), scratch.path().join(file)).unwrap();
    }
    std::fs::copy(fixtures.join("configmaps/autoscaler.yaml"), scratch.path().join("config-autoscaler.yaml")).unwrap();
    let rel = |p: PathBuf| relative(scratch.path(), &p).display().to_string();
    let mut resources: Vec<String> = files.iter().map(|f| (*f).to_owned()).collect();
    resources.extend(["config-autoscaler.yaml".to_owned(), rel(manifests().join("redis"))]);
    let components: Vec<String> = knative
        .components
        .iter()
        .map(|c| rel(manifests().join("knative").join(c)))
        .chain(optional.iter().map(|c| rel(manifests().join("knative").join(c))))
        .chain(top.components.iter().map(|c| rel(manifests().join(c))))
        .collect();
    let composed = serde_json::json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
        "components": components,
        "images": knative.images,
    });
    std::fs::write(scratch.path().join("kustomization.yaml"), serde_yaml_ng::to_string(&composed).unwrap()).unwrap();
    kustomize(scratch.path())
}

#[test]
fn pin_aware_scale_down_is_an_optional_component_with_one_rule() {
    if !kubectl() {
        return;
    }
    let Some(fixtures) = fixtures::dir() else { return };
    let env_of = |objects: &[Value]| {
        find(objects, "Deployment", "activator")["spec"]["template"]["spec"]["containers"][0]["env"].clone()
    };
    let wants = |env: &Value| {
        env.as_array().unwrap().iter().any(|e| e["name"] == "ACTIVATOR_POD_DELETION_COST" && e["value"] == "true")
    };
    let plain = composed(&fixtures, &[]);
    assert!(!wants(&env_of(&plain)), "off unless asked for");
    let patching_pods = |objects: &[Value]| {
        objects.iter().filter(|o| o["kind"] == "ClusterRole").any(|role| {
            role["rules"].as_array().into_iter().flatten().any(|rule| {
                rule["resources"].as_array().is_some_and(|r| r.iter().any(|r| r == "pods"))
                    && rule["verbs"].as_array().is_some_and(|v| v.iter().any(|v| v == "patch"))
            })
        })
    };
    assert!(!patching_pods(&plain), "the default install never writes to a pod");

    let objects = composed(&fixtures, &["pod-deletion-cost"]);
    assert!(wants(&env_of(&objects)));
    assert!(env_of(&objects).as_array().unwrap().iter().any(|e| e["name"] == "POD_IP"), "the other variables stay");
    let role = find(&objects, "ClusterRole", "affinity-activator-pod-deletion-cost");
    assert_eq!(role["rules"], serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]));
    let binding = find(&objects, "ClusterRoleBinding", "affinity-activator-pod-deletion-cost");
    assert_eq!(binding["subjects"][0]["name"], "activator");
    assert_eq!(binding["roleRef"]["name"], "affinity-activator-pod-deletion-cost");
}

#[test]
fn standalone_mode_is_granted_what_it_watches_and_the_shim_what_it_scales() {
    if !kubectl() {
        return;
    }
    let objects = kustomize(&manifests().join("standalone"));
    assert!(
        objects
            .iter()
            .filter(|o| o["kind"] != "Namespace" && !o["kind"].as_str().unwrap().starts_with("Cluster"))
            .all(|o| o["metadata"]["namespace"] == "affinity-activator"),
        "everything namespaced in affinity-activator"
    );
    let rules = |role: &str| -> std::collections::BTreeSet<(String, String, String)> {
        let role: ClusterRole = serde_json::from_value(find(&objects, "ClusterRole", role).clone()).unwrap();
        let mut out = std::collections::BTreeSet::new();
        for rule in role.rules.unwrap_or_default() {
            for group in rule.api_groups.unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    for verb in &rule.verbs {
                        out.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
        out
    };
    let watched: std::collections::BTreeSet<(String, String, String)> = activator::source::standalone::WATCHED
        .iter()
        .flat_map(|(group, plural)| {
            ["get", "list", "watch"].map(|verb| ((*group).to_owned(), (*plural).to_owned(), verb.to_owned()))
        })
        .collect();
    assert_eq!(rules("affinity-activator-standalone"), watched, "exactly what standalone mode watches, read only");
    let shim = rules("autoscaler-shim");
    let grant = |g: &str, r: &str, v: &str| (g.to_owned(), r.to_owned(), v.to_owned());
    assert_eq!(
        shim,
        [
            grant("apps", "deployments", "get"),
            grant("apps", "deployments/scale", "get"),
            grant("apps", "deployments/scale", "patch")
        ]
        .into()
    );
    let activator = find(&objects, "Deployment", "affinity-activator");
    let args = &activator["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(args.as_array().unwrap().iter().any(|a| a == "--mode=standalone"), "{args}");
    let shim = find(&objects, "Deployment", "autoscaler-shim");
    let args = &shim["spec"]["template"]["spec"]["containers"][0]["args"];
    for flag in ["--backend=kubernetes", "--deployment-name={revision}"] {
        assert!(args.as_array().unwrap().iter().any(|a| a == flag), "{flag} in {args}");
    }
    let url = format!("--autoscaler-url=ws://{}:8080", shim["metadata"]["name"].as_str().unwrap());
    assert!(
        activator["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap().iter().any(|a| *a == url)
    );

    // The example opts its Service in for its own Deployment.
    let example = documents(&manifests().join("standalone/example/counter.yaml"));
    let (deployment, service) = (find(&example, "Deployment", "counter"), find(&example, "Service", "counter"));
    assert_eq!(service["metadata"]["annotations"]["activator.knative.dev/deployment"], deployment["metadata"]["name"]);
    assert_eq!(deployment["spec"]["replicas"], 0, "starts at zero");
}

fn rules_of<T: DeserializeOwned>(
    docs: &[Value],
    kind: &str,
    name: &str,
    rules: fn(T) -> Option<Vec<PolicyRule>>,
) -> Vec<PolicyRule> {
    rules(serde_json::from_value(find(docs, kind, name).clone()).unwrap()).unwrap_or_default()
}

/// (API group, resource) pairs that `rules` grant get, list and watch on.
fn readable(rules: &[PolicyRule]) -> BTreeSet<(String, String)> {
    let reads = |r: &&PolicyRule| ["get", "list", "watch"].iter().all(|v| r.verbs.iter().any(|w| w == v));
    rules
        .iter()
        .filter(reads)
        .filter(|r| r.resource_names.as_ref().is_none_or(Vec::is_empty))
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |g| resources.clone().into_iter().map(move |res| (g.clone(), res)))
        })
        .collect()
}

#[test]
fn the_rbac_we_add_is_exactly_what_knative_mode_watches_beyond_upstream() {
    let ours = documents(&manifests().join("knative/activator/rbac.yaml"));
    let rules = rules_of::<ClusterRole>(&ours, "ClusterRole", "affinity-activator", |r| r.rules);
    for rule in &rules {
        assert_eq!(rule.verbs, ["get", "list", "watch"], "read only: {rule:?}");
    }
    let granted = readable(&rules);
    let total: usize =
        rules.iter().map(|r| r.api_groups.iter().flatten().count() * r.resources.iter().flatten().count()).sum();
    assert_eq!(total, granted.len(), "no rule grants more than reading");
    let beyond: BTreeSet<(String, String)> =
        WATCHED.iter().filter(|w| w.beyond_upstream).map(|w| (w.group.to_owned(), w.plural.to_owned())).collect();
    assert_eq!(granted, beyond, "a watch without a rule, or a rule without a watch");
    assert!(WATCHED.iter().filter(|w| w.beyond_upstream).all(|w| !w.in_system_namespace));
    let binding: ClusterRoleBinding =
        serde_json::from_value(find(&ours, "ClusterRoleBinding", "affinity-activator").clone()).unwrap();
    assert_eq!(binding.role_ref.name, "affinity-activator");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", "activator", Some("knative-serving"))
    );

    // Upstream's grants the rest, each where the watch looks.
    let Some(fixtures) = fixtures::dir() else { return };
    let stock = documents(&fixtures.join("activator-roles.yaml"));
    let cluster =
        readable(&rules_of::<ClusterRole>(&stock, "ClusterRole", "knative-serving-activator-cluster", |r| r.rules));
    let namespaced = readable(&rules_of::<Role>(&stock, "Role", "knative-serving-activator", |r| r.rules));
    for w in &WATCHED {
        let pair = (w.group.to_owned(), w.plural.to_owned());
        let stock_grants = if w.in_system_namespace { namespaced.contains(&pair) } else { cluster.contains(&pair) };
        assert_eq!(stock_grants, !w.beyond_upstream, "{}: beyond_upstream says otherwise", w.resource());
    }
}

/// The instructions of each stage of a Dockerfile, continuation lines joined and comments dropped.
fn dockerfile_stages(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
                continue;
            }
            None => pending.push_str(trimmed),
        }
        let instruction = std::mem::take(&mut pending);
        let (keyword, args) = instruction.split_once(char::is_whitespace).unwrap_or((&instruction, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push((keyword, args.trim().to_owned()));
        }
    }
    stages
}

#[test]
fn the_image_runs_as_a_numeric_user_with_an_exec_form_entrypoint() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages = dockerfile_stages(&text);
    assert!(stages.len() >= 2, "multi-stage");
    let last = stages.last().unwrap();
    let get = |stage: &[(String, String)], keyword: &str| {
        stage.iter().rev().find(|(k, _)| k == keyword).map(|(_, a)| a.clone())
    };
    let user = get(last, "USER").expect("the final stage sets USER");
    assert!(
        user.split(':').all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())),
        "USER {user} must be numeric (runAsNonRoot cannot check a name)"
    );
    assert_ne!(user.split(':').next(), Some("0"), "not root");
    let entrypoint = get(last, "ENTRYPOINT").expect("ENTRYPOINT");
    let exec: Vec<String> =
        serde_json::from_str(&entrypoint).unwrap_or_else(|_| panic!("shell-form ENTRYPOINT {entrypoint}"));
    assert_eq!(exec, ["/activator", "--mode", "knative"]);
    assert!(
        last.iter().any(|(k, a)| k == "COPY" && a.contains("autoscaler-shim")),
        "the image carries autoscaler-shim"
    );
    assert!(last.iter().all(|(k, _)| k != "RUN" && k != "VOLUME"), "the runtime stage runs and writes nothing");
    for stage in &stages[1..] {
        if let Some(entrypoint) = get(stage, "ENTRYPOINT") {
            assert!(serde_json::from_str::<Vec<String>>(&entrypoint).is_ok(), "shell-form ENTRYPOINT {entrypoint}");
            assert!(get(stage, "USER").is_some_and(|u| u.bytes().all(|b| b.is_ascii_digit() || b == b':')));
        }
    }
    // The parser reads what it must reject.
    let shell_form = dockerfile_stages("FROM x\nUSER app\nENTRYPOINT /activator --mode knative\n");
    assert!(serde_json::from_str::<Vec<String>>(&get(&shell_form[0], "ENTRYPOINT").unwrap()).is_err());
}

/// The PromQL of every panel of the Grafana dashboard.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((title.clone(), target["expr"].as_str().expect("a PromQL expr").to_owned()));
        }
    }
    queries
}

/// Identifiers in `expr` that name our or upstream's metrics.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| ["activator_", "kn_", "http_server_"].iter().any(|p| word.starts_with(p)))
        .collect()
}

#[test]
fn the_dashboard_queries_only_metrics_the_activator_exports() {
    let path = manifests().join("observability/dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let families = activator::instruments::Instruments::register().registrar.family_names();
    let exported = |name: &str| {
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        families.iter().any(|f| f == family || f == name)
    };
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:?}");
    let mut unknown = Vec::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: {expr} queries no metric of ours");
        unknown.extend(names.into_iter().filter(|n| !exported(n)).map(|n| format!("{title}: {n}")));
    }
    assert!(unknown.is_empty(), "the dashboard queries metrics the activator does not export: {unknown:#?}");
    // The check can fail: a name the activator does not export is caught.
    assert!(!exported("activator_request_count") && exported("activator_request_duration_seconds_bucket"));

    // What the kustomization ships is the same dashboard, labelled for Grafana's sidecar.
    if kubectl() {
        let objects = kustomize(&manifests().join("observability"));
        let map = objects.iter().find(|o| o["kind"] == "ConfigMap").expect("the dashboard's ConfigMap");
        let map: ConfigMap = serde_json::from_value(map.clone()).unwrap();
        assert_eq!(map.metadata.labels.unwrap_or_default().get("grafana_dashboard").map(String::as_str), Some("1"));
        let shipped: Value = serde_json::from_str(&map.data.unwrap_or_default()["dashboard.json"]).unwrap();
        assert_eq!(shipped, dashboard);
    }
}

/// The alerts: each names only metrics the activator exports, says what to look at, and together
/// they cover what the install docs promise an alert for. The PodMonitor scrapes the port the
/// Deployment names `metrics`, keeping the activator's own labels.
#[test]
fn the_alerts_watch_what_breaks_with_metrics_the_activator_exports() {
    let families = activator::instruments::Instruments::register().registrar.family_names();
    let rules: PrometheusRule =
        serde_json::from_value(documents(&manifests().join("observability/prometheusrule.yaml")).remove(0)).unwrap();
    let alerts: Vec<&AlertingRule> = rules.spec.groups.iter().flat_map(|g| &g.rules).collect();
    let mut covered = BTreeSet::new();
    for alert in &alerts {
        let names = metric_names(&alert.expr);
        assert!(!names.is_empty(), "{}: {}", alert.alert, alert.expr);
        for name in names {
            assert!(families.iter().any(|f| f == name), "{}: {name} is not exported", alert.alert);
            covered.insert(name);
        }
        assert!(alert.annotations.contains_key("summary") && alert.annotations.contains_key("description"));
        assert!(alert.labels.contains_key("severity"), "{}", alert.alert);
    }
    for promised in [
        "activator_pin_store_up",
        "activator_kube_watch_forbidden",
        "activator_queued_requests",
        "activator_requests_total",
        "activator_topology_reloads_total",
    ] {
        assert!(covered.contains(promised), "no alert on {promised}");
    }
    for code in ["503", "502"] {
        assert!(alerts.iter().any(|a| a.expr.contains(&format!("code=\"{code}\""))), "no alert on {code} rates");
    }

    let monitor: PodMonitor =
        serde_json::from_value(documents(&manifests().join("observability/podmonitor.yaml")).remove(0)).unwrap();
    let deployment = documents(&manifests().join("knative/activator/deployment.yaml")).remove(0);
    let ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    let endpoint = &monitor.spec.pod_metrics_endpoints[0];
    let port = ports.as_array().unwrap().iter().find(|p| p["name"] == endpoint.port.as_str()).expect("the port");
    assert_eq!(port["containerPort"], 9090);
    assert!(endpoint.honor_labels, "the activator's namespace label is the Knative object's, not the pod's");
    let selected = monitor.spec.selector.match_labels.unwrap_or_default();
    for (k, v) in &selected {
        assert_eq!(deployment["spec"]["template"]["metadata"]["labels"][k], v.as_str());
    }
    assert_eq!(monitor.spec.namespace_selector.match_names, ["knative-serving"]);
}

/// Where `ours` loses or changes what `upstream` sets, as paths: list elements are matched by
/// their `name` where they have one (containers, env, ports), else by position.
fn departures(upstream: &Value, ours: &Value, path: &str, out: &mut Vec<String>) {
    match (upstream, ours) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => departures(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                let found = match v.get("name") {
                    Some(name) => b.iter().find(|w| w.get("name") == Some(name)).map(|w| (format!("[{name}]"), w)),
                    None => b.get(i).map(|w| (format!("[{i}]"), w)),
                };
                match found {
                    Some((at, w)) => departures(v, w, &format!("{path}{at}"), out),
                    None => out.push(format!("{path}[{}]", v.get("name").unwrap_or(&Value::from(i)))),
                }
            }
        }
        // Kubernetes reads a quantity or an integer-or-string alike in either spelling.
        (a, b) if a.to_string().trim_matches('"') == b.to_string().trim_matches('"') => {}
        _ => out.push(path.to_owned()),
    }
}

/// Runs `just release`'s script with `env` (and a `docker` that says there is no daemon, so the
/// result does not depend on this machine): whether it succeeded, and what it said on stderr.
fn release(out: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let no_docker = out.join("bin");
    std::fs::create_dir_all(&no_docker).unwrap();
    let docker = no_docker.join("docker");
    std::fs::write(&docker, "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&docker, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", no_docker.display(), std::env::var("PATH").unwrap_or_default());
    let result = Command::new("bash")
        .arg(root().join("manifests/release/release.sh"))
        .arg("0.0.0-test")
        .env("PATH", path)
        .env("RELEASE_DIR", out)
        .env_remove("IMAGE")
        .env_remove("REDIS_IMAGE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (result.status.success(), String::from_utf8_lossy(&result.stderr).into_owned())
}

/// `just release 0.0.0-test` with no container runtime: the image part says what it needs in one
/// line; given digests, the YAML part renders files whose every object reads as its Kubernetes
/// type, whose every image is pinned, which hold nothing but the activator's own objects (and
/// Redis's), and which keep everything upstream's v1.23.0 activator objects set, but for the
/// differences named here.
#[test]
fn the_release_yaml_is_the_activators_own_objects_pinned_and_keeping_upstreams() {
    if !kubectl() {
        return;
    }
    let Some(fixtures) = fixtures::dir() else { return };
    let out = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (ok, said) = release(out.path(), &[]);
    assert!(!ok, "no image without a runtime");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.starts_with("error: no container runtime here") && said.contains("IMAGE="), "{said}");
    let (ok, said) = release(out.path(), &[("IMAGE", "ghcr.io/acme/affinity-activator:0.0.0-test")]);
    assert!(!ok && said.contains("must name the image by digest"), "{said}");

    let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let image = format!("ghcr.io/acme/affinity-activator:0.0.0-test@{}", digest('a'));
    let redis_image = format!("redis:7.2-alpine@{}", digest('b'));
    let (ok, said) = release(out.path(), &[("IMAGE", &image), ("REDIS_IMAGE", &redis_image)]);
    assert!(ok, "{said}");
    let activator = documents(&out.path().join("affinity-activator.yaml"));
    let redis = documents(&out.path().join("affinity-activator-redis.yaml"));

    for doc in activator.iter().chain(&redis) {
        check_document(doc).unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
        let spec = &doc["spec"]["template"]["spec"];
        let containers = spec["containers"].as_array().into_iter().chain(spec["initContainers"].as_array()).flatten();
        for container in containers {
            let reference = container["image"].as_str().unwrap();
            let (_, pinned) = reference.rsplit_once("@sha256:").unwrap_or_else(|| panic!("{reference} is not pinned"));
            assert!(pinned.len() == 64 && pinned.bytes().all(|b| b.is_ascii_hexdigit()), "{reference}");
        }
        assert_eq!(doc["metadata"]["labels"]["app.kubernetes.io/version"], "0.0.0-test", "{}", doc["kind"]);
    }
    let named = |docs: &[Value]| -> BTreeSet<(String, String, String)> {
        docs.iter()
            .map(|d| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (text(&d["kind"]), text(&d["metadata"]["namespace"]), text(&d["metadata"]["name"]))
            })
            .collect()
    };
    let ns = "knative-serving";
    let expected: BTreeSet<(String, String, String)> = [
        ("Deployment", ns, "activator"),
        ("HorizontalPodAutoscaler", ns, "activator"),
        ("PodDisruptionBudget", ns, "activator-pdb"),
        ("ClusterRole", "", "affinity-activator"),
        ("ClusterRoleBinding", "", "affinity-activator"),
        ("ConfigMap", ns, "config-affinity-activator"),
    ]
    .map(|(k, n, m)| (k.to_owned(), n.to_owned(), m.to_owned()))
    .into();
    assert_eq!(named(&activator), expected, "the activator's objects and nothing else of knative-serving");
    assert!(named(&redis).iter().all(|(_, n, name)| n == ns && name.starts_with("affinity-activator-redis")));
    let deployment = find(&activator, "Deployment", "activator");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/acme/affinity-activator@{}", digest('a'))
    );

    // Against upstream's objects: what differs is named, with why.
    let upstream: Vec<Value> =
        [documents(&fixtures.join("activator.yaml")), documents(&fixtures.join("activator-hpa.yaml"))].concat();
    let mut differs = Vec::new();
    for (kind, name) in [
        ("Deployment", "activator"),
        ("HorizontalPodAutoscaler", "activator"),
        ("PodDisruptionBudget", "activator-pdb"),
    ] {
        let mut paths = Vec::new();
        departures(find(&upstream, kind, name), find(&activator, kind, name), "", &mut paths);
        differs.extend(paths.into_iter().map(|p| format!("{kind} {p}")));
    }
    let allowed = [
        // Our version, not Knative's `devel` placeholder.
        "Deployment .metadata.labels.app.kubernetes.io/version",
        "Deployment .spec.template.metadata.labels.app.kubernetes.io/version",
        "HorizontalPodAutoscaler .metadata.labels.app.kubernetes.io/version",
        "PodDisruptionBudget .metadata.labels.app.kubernetes.io/version",
        // Our image, and memory sized from our bench.
        "Deployment .spec.template.spec.containers[\"activator\"].image",
        "Deployment .spec.template.spec.containers[\"activator\"].resources.requests.memory",
        // Read by Go's runtime only.
        "Deployment .spec.template.spec.containers[\"activator\"].env[\"GOGC\"]",
        // Two replicas at least, so a session always has a second activator.
        "HorizontalPodAutoscaler .spec.minReplicas",
        // maxUnavailable 1 instead: 80 % of two replicas would block every node drain.
        "PodDisruptionBudget .spec.minAvailable",
    ];
    let (differs, allowed): (BTreeSet<&str>, BTreeSet<&str>) =
        (differs.iter().map(String::as_str).collect(), allowed.into_iter().collect());
    assert_eq!(differs, allowed, "nothing else upstream sets is lost or changed");
}

//! An in-process Kubernetes API server for the tests: list and watch over real HTTP, as the API
//! server speaks them, for the kinds the activator reads. Objects carry resource versions; lists
//! come a page at a time when asked (`limit`, `continue`, `410 Gone` for a token from before a
//! compaction); a watch replays what changed after the version it asks for, then streams changes
//! as chunked JSON lines, sends bookmarks when asked, sees an object that stops matching its
//! selector leave, and ends after its `timeoutSeconds`; a watch from before a compaction gets
//! `410 Gone`; a kind can be forbidden (`403`, as under the stock RBAC); every open watch can be
//! closed at once. Tests put and delete objects (see
//! `knative` for Knative-shaped ones) and the activator sees them through kube-rs.
//!
//! Beyond list and watch, what the activator and autoscaler-shim change: a merge `PATCH` of one
//! object (pod annotations), `GET` of one object, and a Deployment's `scale` subresource (`GET`,
//! merge `PATCH` of `spec.replicas`). Every patch is recorded, for tests to see what was written
//! and when.
//!
//! One server serves any number of tests' objects; each test starts its own.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The kinds the activator lists and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Revision,
    Route,
    KnativeService,
    Endpoints,
    Service,
    ConfigMap,
    Secret,
    Pod,
    Deployment,
    EndpointSlice,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::Revision,
        Kind::Route,
        Kind::KnativeService,
        Kind::Endpoints,
        Kind::Service,
        Kind::ConfigMap,
        Kind::Secret,
        Kind::Pod,
        Kind::Deployment,
        Kind::EndpointSlice,
    ];

    /// API group prefix and resource plural, as in the request path.
    fn resource(self) -> (&'static str, &'static str) {
        match self {
            Kind::Revision => ("apis/serving.knative.dev/v1", "revisions"),
            Kind::Route => ("apis/serving.knative.dev/v1", "routes"),
            Kind::KnativeService => ("apis/serving.knative.dev/v1", "services"),
            Kind::Endpoints => ("api/v1", "endpoints"),
            Kind::Service => ("api/v1", "services"),
            Kind::ConfigMap => ("api/v1", "configmaps"),
            Kind::Secret => ("api/v1", "secrets"),
            Kind::Pod => ("api/v1", "pods"),
            Kind::Deployment => ("apis/apps/v1", "deployments"),
            Kind::EndpointSlice => ("apis/discovery.k8s.io/v1", "endpointslices"),
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Revision => "RevisionList",
            Kind::Route => "RouteList",
            Kind::KnativeService => "ServiceList",
            Kind::Endpoints => "EndpointsList",
            Kind::Service => "ServiceList",
            Kind::ConfigMap => "ConfigMapList",
            Kind::Secret => "SecretList",
            Kind::Pod => "PodList",
            Kind::Deployment => "DeploymentList",
            Kind::EndpointSlice => "EndpointSliceList",
        }
    }

    /// What an RBAC denial of `verb` on this kind says, as the API server words it.
    fn forbidden_message(self, verb: &str) -> String {
        let (prefix, plural) = self.resource();
        let group = prefix.strip_prefix("apis/").and_then(|g| g.split('/').next()).unwrap_or("");
        format!(
            "{plural}{} is forbidden: User \"system:serviceaccount:knative-serving:activator\" cannot {verb} \
             resource \"{plural}\" in API group \"{group}\" at the cluster scope",
            if group.is_empty() { String::new() } else { format!(".{group}") }
        )
    }
}

#[derive(Clone, Debug)]
struct Change {
    kind: Kind,
    version: u64,
    event: &'static str,
    object: Value,
    /// What the object was before (`MODIFIED` and `DELETED`), so a watch with a selector sees an
    /// object that stops matching it leave, as the API server's watch cache sends it.
    previous: Option<Value>,
}

impl Change {
    /// The event a watch selecting with `keep` gets for this change, if any.
    fn seen_by(&self, keep: &dyn Fn(&Value) -> bool) -> Option<(&'static str, &Value)> {
        let was = self.previous.as_ref().is_some_and(keep);
        match self.event {
            "DELETED" => was.then(|| ("DELETED", self.previous.as_ref().unwrap_or(&self.object))),
            _ if keep(&self.object) => Some((if was { "MODIFIED" } else { "ADDED" }, &self.object)),
            _ if was => Some(("DELETED", &self.object)),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Store {
    version: u64,
    /// Per kind, by (namespace, name): the object with its resourceVersion set.
    objects: BTreeMap<Kind, BTreeMap<(String, String), Value>>,
    /// Every change since the last compaction, for watches that resume.
    history: Vec<Change>,
    /// Watches asking for a version older than this get 410 Gone.
    compacted_to: u64,
    forbidden: HashSet<Kind>,
    /// While set, every request gets 503, as from an API server that is not up yet.
    held: bool,
    /// Every patch applied, in order.
    patches: Vec<Patched>,
}

/// A patch the server applied.
#[derive(Clone, Debug)]
pub struct Patched {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The merge patch as sent (for a Deployment's scale, the Scale's patch).
    pub patch: Value,
    pub at: std::time::Instant,
}

impl Store {
    /// Creates or replaces `object`, as a watch sees it.
    fn put(&mut self, kind: Kind, mut object: Value, changes: &broadcast::Sender<Change>) -> Value {
        let key = key_of(&object);
        self.version += 1;
        let version = self.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let previous = self.objects.entry(kind).or_default().insert(key, object.clone());
        let event = if previous.is_some() { "MODIFIED" } else { "ADDED" };
        let change = Change { kind, version, event, object: object.clone(), previous };
        self.history.push(change.clone());
        let _ = changes.send(change);
        object
    }
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch stream.
    closing: tokio::sync::watch::Sender<u64>,
}

/// A handle on the server; clones share it.
#[derive(Clone)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
            closing: tokio::sync::watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the API server");
        let addr = listener.local_addr().expect("bound address");
        let app = Router::new().fallback(serve).with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        ApiServer { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points kube-rs at this server, and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig.yaml");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n",
            self.url()
        );
        std::fs::write(&path, config).expect("writing the kubeconfig");
        path
    }

    /// Creates or replaces an object (keyed by its metadata's namespace and name).
    pub fn put(&self, kind: Kind, object: Value) {
        self.shared.store.lock().unwrap().put(kind, object, &self.shared.changes);
    }

    /// The object of `kind` named `name` in `namespace`, as stored now.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.store.lock().unwrap();
        store.objects.get(&kind)?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Every patch of `kind` applied so far, in order.
    pub fn patches(&self, kind: Kind) -> Vec<Patched> {
        self.shared.store.lock().unwrap().patches.iter().filter(|p| p.kind == kind).cloned().collect()
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.shared.store.lock().unwrap();
        let Some(mut object) = store.objects.entry(kind).or_default().remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let change = Change { kind, version, event: "DELETED", previous: Some(object.clone()), object };
        store.history.push(change.clone());
        let _ = self.shared.changes.send(change);
    }

    /// Answers every request with 503 until `release`, as an API server not up yet.
    pub fn hold(&self) {
        self.shared.store.lock().unwrap().held = true;
    }

    pub fn release(&self) {
        self.shared.store.lock().unwrap().held = false;
    }

    /// Denies every request for `kind` with 403, as the stock RBAC does for Routes and Services.
    pub fn forbid(&self, kind: Kind) {
        self.shared.store.lock().unwrap().forbidden.insert(kind);
    }

    /// Lets list and watch of `kind` through again.
    pub fn permit(&self, kind: Kind) {
        self.shared.store.lock().unwrap().forbidden.remove(&kind);
    }

    /// Ends every open watch stream; clients resume from the version they last saw.
    pub fn close_watches(&self) {
        self.shared.closing.send_modify(|n| *n += 1);
    }

    /// Forgets the history, so a watch resuming from any version seen so far gets 410 Gone and
    /// must list again; and ends every open watch so that happens now.
    pub fn compact(&self) {
        {
            let mut store = self.shared.store.lock().unwrap();
            store.compacted_to = store.version + 1;
            store.history.clear();
        }
        self.close_watches();
    }
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (text(&meta["namespace"]), text(&meta["name"]))
}

/// What a path names within a kind.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// Every object (of a namespace).
    Collection,
    /// One object, by name.
    Object(String),
    /// A Deployment's scale subresource.
    Scale(String),
}

/// Which kind a path names, the namespace it is limited to, and what in it.
fn route(path: &str) -> Option<(Kind, Option<String>, Target)> {
    let path = path.trim_start_matches('/');
    Kind::ALL.into_iter().find_map(|kind| {
        let (prefix, plural) = kind.resource();
        let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
        if rest == plural {
            return Some((kind, None, Target::Collection));
        }
        let (namespace, rest) = rest.strip_prefix("namespaces/")?.split_once('/')?;
        let target = match rest.strip_prefix(plural)?.split('/').collect::<Vec<_>>().as_slice() {
            [""] => Target::Collection,
            ["", name] if !name.is_empty() => Target::Object((*name).to_owned()),
            ["", name, "scale"] if kind == Kind::Deployment => Target::Scale((*name).to_owned()),
            _ => return None,
        };
        Some((kind, Some(namespace.to_owned()), target))
    })
}

/// RFC 7386's JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// A Deployment's Scale, as `autoscaling/v1` writes it.
fn scale_of(deployment: &Value) -> Value {
    let meta = &deployment["metadata"];
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": meta["resourceVersion"]},
           "spec": {"replicas": deployment["spec"]["replicas"].as_i64().unwrap_or(1)},
           "status": {"replicas": deployment["status"]["replicas"].as_i64().unwrap_or(0)}})
}

/// A label or field selector: comma-separated `key`, `!key`, `key=value`, `key==value`,
/// `key!=value`.
fn matches(selector: Option<&String>, fields: impl Fn(&str) -> Option<String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| {
        if let Some((key, value)) = term.split_once("!=") {
            fields(key).as_deref() != Some(value)
        } else if let Some((key, value)) = term.split_once('=') {
            fields(key).as_deref() == Some(value.trim_start_matches('='))
        } else if let Some(key) = term.strip_prefix('!') {
            fields(key).is_none()
        } else {
            fields(term).is_some()
        }
    })
}

fn selected(object: &Value, namespace: Option<&str>, query: &BTreeMap<String, String>) -> bool {
    let meta = &object["metadata"];
    let labels = |key: &str| meta["labels"][key].as_str().map(str::to_owned);
    let fields = |key: &str| match key {
        "metadata.name" => meta["name"].as_str().map(str::to_owned),
        "metadata.namespace" => meta["namespace"].as_str().map(str::to_owned),
        _ => None,
    };
    namespace.is_none_or(|ns| meta["namespace"].as_str() == Some(ns))
        && matches(query.get("labelSelector"), labels)
        && matches(query.get("fieldSelector"), fields)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some((kind, namespace, target)) = route(uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status(404, "NotFound", "the server could not find the requested resource")),
        )
            .into_response();
    };
    if shared.store.lock().unwrap().held {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(status(503, "ServiceUnavailable", "the server is starting")),
        )
            .into_response();
    }
    let verb = match (&method, &target) {
        (&axum::http::Method::PATCH, _) => "patch",
        (_, Target::Collection) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        (_, Target::Collection) => "list",
        _ => "get",
    };
    if shared.store.lock().unwrap().forbidden.contains(&kind) {
        return (StatusCode::FORBIDDEN, axum::Json(status(403, "Forbidden", &kind.forbidden_message(verb))))
            .into_response();
    }
    match target {
        Target::Collection => {}
        Target::Object(name) | Target::Scale(name) if verb == "get" || verb == "patch" => {
            let scale = uri.path().ends_with("/scale");
            return one(
                &shared,
                kind,
                &namespace.unwrap_or_default(),
                &name,
                scale,
                (verb == "patch").then_some(&body),
            );
        }
        _ => {
            return (StatusCode::METHOD_NOT_ALLOWED, axum::Json(status(405, "MethodNotAllowed", verb))).into_response();
        }
    }
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        return list(&shared.store.lock().unwrap(), kind, namespace.as_deref(), &query);
    }
    watch(shared, kind, namespace, query)
}

/// One object (or a Deployment's Scale), read or merge-patched.
fn one(shared: &Shared, kind: Kind, namespace: &str, name: &str, scale: bool, patch: Option<&Bytes>) -> Response {
    let mut store = shared.store.lock().unwrap();
    let key = (namespace.to_owned(), name.to_owned());
    let Some(mut object) = store.objects.get(&kind).and_then(|o| o.get(&key)).cloned() else {
        let message = format!("{} \"{name}\" not found", kind.resource().1);
        return (StatusCode::NOT_FOUND, axum::Json(status(404, "NotFound", &message))).into_response();
    };
    if let Some(body) = patch {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return (StatusCode::BAD_REQUEST, axum::Json(status(400, "BadRequest", "not JSON"))).into_response();
        };
        if scale {
            merge(&mut object["spec"]["replicas"], &patch["spec"]["replicas"]);
        } else {
            merge(&mut object, &patch);
        }
        let at = std::time::Instant::now();
        store.patches.push(Patched { kind, namespace: namespace.to_owned(), name: name.to_owned(), patch, at });
        object = store.put(kind, object, &shared.changes);
    }
    axum::Json(if scale { scale_of(&object) } else { object }).into_response()
}

/// A list, a page at a time when `limit` asks: the `continue` token names the version the list
/// began at and the last key given; once that version is compacted away the token is `410 Gone`,
/// and the client lists again from the start.
fn list(store: &Store, kind: Kind, namespace: Option<&str>, query: &BTreeMap<String, String>) -> Response {
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let (version, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (store.version, None),
        Some(token) => {
            let parsed =
                token.split_once('|').and_then(|(v, key)| Some((v.parse::<u64>().ok()?, key.split_once('/')?)));
            match parsed {
                Some((version, _)) if version < store.compacted_to => {
                    let expired = status(410, "Expired", "The provided continue parameter is too old");
                    return (StatusCode::GONE, axum::Json(expired)).into_response();
                }
                Some((version, (ns, name))) => (version, Some((ns.to_owned(), name.to_owned()))),
                None => {
                    let bad = status(400, "BadRequest", "invalid continue token");
                    return (StatusCode::BAD_REQUEST, axum::Json(bad)).into_response();
                }
            }
        }
    };
    let mut items = store
        .objects
        .get(&kind)
        .into_iter()
        .flat_map(|objects| objects.iter())
        .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after))
        .filter(|(_, o)| selected(o, namespace, query));
    let page: Vec<(&(String, String), &Value)> = items.by_ref().take(limit).collect();
    let more = items.next().is_some();
    let continue_token = match (more, page.last()) {
        (true, Some(((ns, name), _))) => format!("{version}|{ns}/{name}"),
        _ => String::new(),
    };
    let (group, _) = kind.resource();
    let page: Vec<&Value> = page.into_iter().map(|(_, o)| o).collect();
    let list = json!({"apiVersion": group.trim_start_matches("apis/").trim_start_matches("api/"),
                      "kind": kind.list_kind(),
                      "metadata": {"resourceVersion": version.to_string(), "continue": continue_token},
                      "items": page});
    axum::Json(list).into_response()
}

/// A watch: the changes after the asked version, then live ones, one JSON line each, until the
/// test closes watches or the watch's `timeoutSeconds` passes (as the API server ends watches);
/// with `allowWatchBookmarks`, a `BOOKMARK` with the current version every second.
fn watch(shared: Arc<Shared>, kind: Kind, namespace: Option<String>, query: BTreeMap<String, String>) -> Response {
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(std::time::Duration::from_secs);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let mut live = shared.changes.subscribe();
    let mut closing = shared.closing.subscribe();
    closing.mark_unchanged();
    let (replay, gone) = {
        let store = shared.store.lock().unwrap();
        let gone = since != 0 && since < store.compacted_to;
        let replay: Vec<Change> =
            store.history.iter().filter(|c| c.kind == kind && c.version > since).cloned().collect();
        (replay, gone)
    };
    let line = |value: Value| Ok::<_, Infallible>(Bytes::from(format!("{value}\n")));
    if gone {
        let error = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        return Response::new(Body::from_stream(futures_util::stream::iter([line(error)])));
    }
    let last = replay.last().map_or(since, |c| c.version);
    let keep = move |o: &Value| selected(o, namespace.as_deref(), &query);
    let event = move |c: &Change| {
        (c.kind == kind).then(|| c.seen_by(&keep)).flatten().map(|(t, o)| json!({"type": t, "object": o}))
    };
    let first: Vec<_> = replay.iter().filter_map(&event).map(line).collect();
    let (events, mut sent) = tokio::sync::mpsc::channel::<Value>(64);
    let (api_version, list_kind) =
        (kind.resource().0.trim_start_matches("apis/").trim_start_matches("api/"), kind.list_kind());
    let object_kind = list_kind.trim_end_matches("List");
    tokio::spawn(async move {
        let ends = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(ends);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                change = live.recv() => match change {
                    Ok(change) if change.version > last => {
                        if let Some(event) = event(&change) && events.send(event).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let version = shared.store.lock().unwrap().version.to_string();
                    let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": object_kind,
                                                                       "metadata": {"resourceVersion": version}}});
                    if events.send(bookmark).await.is_err() {
                        return;
                    }
                }
                () = &mut ends => return,
                _ = closing.changed() => return,
                () = events.closed() => return,
            }
        }
    });
    let rest = futures_util::stream::poll_fn(move |cx| sent.poll_recv(cx));
    Response::new(Body::from_stream(futures_util::stream::iter(first).chain(rest.map(line))))
}

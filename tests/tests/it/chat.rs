//! Conversation affinity without client ids (`sticky-session-chat-prefix`): OpenAI-compatible
//! chat requests through a real activator to demo pods, each turn carrying the whole conversation.
//! Every turn of a conversation reaches one pod, conversations spread over the pods, a 10 MiB
//! body streams through without the activator holding it, and a body that is not a chat request
//! is routed as any other.

use std::collections::BTreeSet;

use bytes::Bytes;
use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, Reply, addrs};

const HOST: &str = "llm.test";
const PATH: &str = "/v1/chat/completions";

/// A chat request as OpenAI's clients write it: the whole conversation so far.
fn chat(messages: &[(&str, &str)]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap();
    let messages: Vec<String> = messages
        .iter()
        .map(|(role, content)| format!(r#"{{"role": {}, "content": {}}}"#, quote(role), quote(content)))
        .collect();
    format!(r#"{{"model": "demo-llm", "messages": [{}], "stream": false}}"#, messages.join(", "))
}

/// The first `turns` requests of conversation `n`: system prompt, then user and assistant turns.
fn conversation(n: usize, turns: usize) -> Vec<String> {
    let system = "You are a helpful assistant.".to_owned();
    let first = format!("Question {n}: what is the capital of country {n}?");
    let mut messages = vec![("system", system), ("user", first)];
    let mut requests = Vec::new();
    for turn in 0..turns {
        let refs: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (*r, c.as_str())).collect();
        requests.push(chat(&refs));
        messages.push(("assistant", format!("Answer {turn}.")));
        messages.push(("user", format!("Follow-up {turn}?")));
    }
    requests
}

async fn post(client: &Client, body: impl Into<reqwest::Body>) -> Reply {
    let req = client.request(reqwest::Method::POST, HOST, PATH).header("content-type", "application/json").body(body);
    let reply = client.send(req).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
}

async fn setup(env: &Env) -> (Vec<Process>, Process) {
    let pods = env.pods("llm-1", 4).await;
    env.write_topology(&yaml(&[Service::new("llm")
        .annotation("activator.knative.dev/sticky-session-chat-prefix", "true")
        .revision("llm-1", 100, &addrs(&pods))]));
    let activator = env.activator(&["--debug-headers"]).await;
    (pods, activator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_turn_of_a_conversation_reaches_one_pod_and_conversations_spread() {
    let env = Env::new();
    let (_pods, activator) = setup(&env).await;
    let client = Client::new(activator.addr("proxy"));
    let mut used = BTreeSet::new();
    for n in 0..8 {
        let mut pods = Vec::new();
        for (turn, body) in conversation(n, 3).into_iter().enumerate() {
            let reply = post(&client, body).await;
            let expected = if turn == 0 { "new-pin" } else { "session-pin" };
            assert_eq!(reply.header("x-activator-decision"), expected, "conversation {n}, turn {turn}");
            assert!(reply.body.contains("read"), "{reply:?}");
            pods.push(reply.pod().to_owned());
        }
        pods.dedup();
        assert_eq!(pods.len(), 1, "conversation {n} kept its pod: {pods:?}");
        used.extend(pods);
    }
    assert!(used.len() > 1, "eight conversations on one pod: {used:?}");

    // Not a chat request: routed by the split, as any request without a session.
    for body in ["not json", r#"{"prompt": "hi"}"#] {
        let reply = post(&client, body).await;
        assert_eq!(reply.header("x-activator-decision"), "split", "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mib_turn_streams_through_to_the_conversations_pod() {
    const MIB: usize = 1024 * 1024;
    let env = Env::new();
    let (_pods, activator) = setup(&env).await;
    let client = Client::new(activator.addr("proxy"));
    let first = post(&client, conversation(0, 1).remove(0)).await;

    // The next turn carries a 10 MiB document the assistant was given, sent as a stream.
    let document = "d".repeat(10 * MIB);
    let body = chat(&[
        ("system", "You are a helpful assistant."),
        ("user", "Question 0: what is the capital of country 0?"),
        ("assistant", &document),
        ("user", "Summarise it."),
    ]);
    let size = body.len();
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        Bytes::from(body).chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let (_, peak_before) = activator.memory_kib();
    let reply = post(&client, reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))).await;
    let (_, peak_after) = activator.memory_kib();
    assert_eq!(reply.pod(), first.pod(), "the long turn reached the conversation's pod");
    assert!(reply.body.contains(&format!("read {size} bytes")), "the whole body arrived: {}", reply.body);
    let grew = (peak_after - peak_before) / 1024;
    assert!(grew < 4, "the activator's peak memory grew by {grew} MiB for a 10 MiB body");
}

/// Review item 4: only a chat request without a session id waits for its body's beginning. A
/// `POST` elsewhere streams from its first byte (here the pod echoes the first chunk while the
/// client still holds the rest back) and is routed as any request without a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prefix_holds_back_only_chat_requests_without_an_id() {
    let env = Env::new();
    let (_pods, activator) = setup(&env).await;
    let client = Client::new(activator.addr("proxy"));
    let body = conversation(0, 1).remove(0);
    // The first chunk names the conversation: were the body read, it would be pinned.
    let (head, rest) = body.split_at(body.find(r#"?"}"#).expect("the first user message") + 3);
    let (send, chunks) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    send.send(Ok(Bytes::copy_from_slice(head.as_bytes()))).await.unwrap();
    let stream = futures_util::stream::unfold(chunks, |mut chunks| async { chunks.recv().await.map(|c| (c, chunks)) });
    let req = client.request(reqwest::Method::POST, HOST, "/echo").body(reqwest::Body::wrap_stream(stream));
    let mut resp = req.send().await.expect("the echo starts before its body ends");
    assert_eq!(resp.headers()["x-activator-decision"], "split", "not the chat path: no conversation read");
    let echoed = resp.chunk().await.unwrap().expect("the first chunk comes back");
    assert!(head.as_bytes().starts_with(&echoed), "{echoed:?}");
    send.send(Ok(Bytes::copy_from_slice(rest.as_bytes()))).await.unwrap();
    drop(send);
    let mut whole = echoed.to_vec();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        whole.extend_from_slice(&chunk);
    }
    assert_eq!(whole, body.as_bytes());

    // On the chat path, an id of its own is the session; the conversation is not read for it.
    let req = client
        .request(reqwest::Method::POST, HOST, PATH)
        .header("k-session", "own-id")
        .header("content-type", "application/json");
    let with_id = client.send(req.body(body.clone())).await;
    assert_eq!(with_id.header("x-activator-decision"), "new-pin");
    let without = post(&client, body).await;
    assert_eq!(without.header("x-activator-decision"), "new-pin", "the conversation was not pinned by the id's turn");
}

/// Review item 5: a client that sends `messages` before `model` keeps its conversation's pod when
/// a turn passes the 64 KiB the activator reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_its_pod_past_64_kib_whatever_its_field_order() {
    let env = Env::new();
    let (_pods, activator) = setup(&env).await;
    let client = Client::new(activator.addr("proxy"));
    let messages_first =
        |messages: serde_json::Value| format!(r#"{{"messages": {messages}, "model": "demo-llm", "stream": false}}"#);
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a helpful assistant."}),
        serde_json::json!({"role": "user", "content": "Summarise the attached report."}),
    ];
    let first = post(&client, messages_first(serde_json::json!(messages))).await;
    assert_eq!(first.header("x-activator-decision"), "new-pin");
    for turn in 0..3 {
        messages.push(serde_json::json!({"role": "assistant", "content": "r".repeat(30 * 1024)}));
        messages.push(serde_json::json!({"role": "user", "content": format!("And part {turn}?")}));
        let body = messages_first(serde_json::json!(messages));
        let reply = post(&client, body.clone()).await;
        assert_eq!(reply.header("x-activator-decision"), "session-pin", "turn {turn} of {} bytes", body.len());
        assert_eq!(reply.pod(), first.pod(), "turn {turn} of {} bytes", body.len());
    }
}

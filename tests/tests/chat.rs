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

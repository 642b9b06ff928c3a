//! Conversation affinity without client ids (`sticky-session-chat-prefix`): an OpenAI-compatible
//! chat request (`/v1/chat/completions`) carries the whole conversation every turn, so its
//! beginning (the system message and the first user message) names the conversation. Routing
//! each turn to the pod that served the previous one reuses that pod's KV cache.
//!
//! Reads at most `PREFIX_LIMIT` bytes of the body, as JSON that may be cut anywhere; a body that
//! is not such JSON, or names no user message within the bound, yields no id and the request is
//! routed as any other. Only what every turn carries at the same place names the conversation:
//! the messages' beginning. Other fields (`model` among them) may come after `messages`, which
//! grows every turn, so whether they fall within the bound would change with the conversation's
//! length; they are left out. Pure: the handler reads the body, this only looks at bytes.

use jiter::{JsonValue, PartialMode};

/// How much of a request body is read to name its conversation; the rest streams through.
pub(crate) const PREFIX_LIMIT: usize = 64 * 1024;

/// The conversation `prefix` (the beginning of a chat request's body) belongs to: a hash of the
/// first system message and the first user message. `None` if it is not a chat request or names
/// no user message.
pub(crate) fn conversation_id(prefix: &[u8]) -> Option<String> {
    let prefix = &prefix[..prefix.len().min(PREFIX_LIMIT)];
    let JsonValue::Object(request) = JsonValue::parse_with_config(prefix, false, PartialMode::TrailingStrings).ok()?
    else {
        return None;
    };
    let Some((_, JsonValue::Array(messages))) = request.iter().find(|(key, _)| key == "messages") else {
        return None;
    };
    let (mut system, mut user) = (None, None);
    for message in messages.iter() {
        let JsonValue::Object(message) = message else { continue };
        let part = |name: &str| message.iter().find(|(key, _)| key == name).map(|(_, value)| value);
        let (Some(JsonValue::Str(role)), Some(content)) = (part("role"), part("content")) else { continue };
        match role.as_ref() {
            "system" | "developer" if system.is_none() => system = Some(text(content)),
            "user" => {
                user = Some(text(content));
                break;
            }
            _ => {}
        }
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for part in [system.as_deref().unwrap_or(""), user.as_deref()?] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    Some(format!("chat-{:032x}", hasher.digest128()))
}

/// A message's text: a string, or the text parts of a list of content parts (images and other
/// parts name nothing the conversation is told apart by).
fn text(content: &JsonValue<'_>) -> String {
    match content {
        JsonValue::Str(text) => text.to_string(),
        JsonValue::Array(parts) => parts
            .iter()
            .filter_map(|part| match part {
                JsonValue::Object(part) => {
                    part.iter().find(|(key, _)| key == "text").and_then(|(_, text)| match text {
                        JsonValue::Str(text) => Some(text.as_ref()),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A chat request as clients write it: model first, each message's role before its content.
    fn chat(model: &str, messages: &[(&str, &str)]) -> Vec<u8> {
        let quote = |s: &str| serde_json::to_string(s).unwrap();
        let messages: Vec<String> = messages
            .iter()
            .map(|(role, content)| format!(r#"{{"role": {}, "content": {}}}"#, quote(role), quote(content)))
            .collect();
        format!(r#"{{"model": {}, "messages": [{}], "stream": true}}"#, quote(model), messages.join(", ")).into_bytes()
    }

    #[test]
    fn every_turn_of_a_conversation_names_it_and_others_differ() {
        let turn1 = chat("m", &[("system", "be brief"), ("user", "hi")]);
        let turn3 = chat("m", &[("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "more")]);
        let id = conversation_id(&turn1).expect("a chat request");
        assert_eq!(conversation_id(&turn3).as_deref(), Some(id.as_str()));
        for other in [
            chat("m", &[("system", "be brief"), ("user", "hello")]),
            chat("m", &[("system", "be long"), ("user", "hi")]),
            chat("m", &[("user", "hi")]),
        ] {
            assert_ne!(conversation_id(&other).as_deref(), Some(id.as_str()));
        }
    }

    #[test]
    fn a_body_cut_at_the_bound_still_names_its_conversation() {
        let long = "x".repeat(200 * 1024);
        let first = chat("m", &[("user", "hi"), ("assistant", &long)]);
        let later = chat("m", &[("user", "hi"), ("assistant", &long), ("user", "and then?")]);
        let id = conversation_id(&first[..PREFIX_LIMIT]);
        assert!(id.is_some());
        assert_eq!(id, conversation_id(&later[..PREFIX_LIMIT]));
        // A first user message longer than the bound counts as far as the bound.
        let huge = chat("m", &[("user", &long)]);
        assert!(conversation_id(&huge[..PREFIX_LIMIT]).is_some());
    }

    #[test]
    fn content_parts_read_as_their_text() {
        let parts = serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]});
        let plain = chat("m", &[("user", "hi")]);
        assert_eq!(conversation_id(&serde_json::to_vec(&parts).unwrap()), conversation_id(&plain));
    }

    /// A chat request with its fields in the order `order` names them (`messages`, `model`,
    /// `stream`, `tools`), as JSON leaves it to the client.
    fn chat_in_order(order: &[&str], messages: &[(&str, &str)]) -> Vec<u8> {
        let messages: Vec<_> =
            messages.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
        let fields: Vec<String> = order
            .iter()
            .map(|field| {
                let value = match *field {
                    "messages" => serde_json::Value::from(messages.clone()),
                    "model" => "m".into(),
                    "stream" => true.into(),
                    _ => serde_json::json!([{"type": "function", "function": {"name": "lookup"}}]),
                };
                format!("{}: {value}", serde_json::to_string(field).unwrap())
            })
            .collect();
        format!("{{{}}}", fields.join(", ")).into_bytes()
    }

    #[test]
    fn a_conversations_key_does_not_depend_on_field_order_past_the_bound() {
        let order = ["messages", "model", "stream"];
        let first = chat_in_order(&order, &[("system", "be brief"), ("user", "hi")]);
        let long = "x".repeat(PREFIX_LIMIT);
        let later =
            chat_in_order(&order, &[("system", "be brief"), ("user", "hi"), ("assistant", &long), ("user", "more")]);
        assert!(later.len() > PREFIX_LIMIT);
        let id = conversation_id(&first);
        assert!(id.is_some());
        assert_eq!(conversation_id(&later[..PREFIX_LIMIT]), id, "model fell past the bound: same conversation");
        assert_eq!(
            conversation_id(&chat_in_order(&["model", "messages"], &[("system", "be brief"), ("user", "hi")])),
            id
        );
    }

    proptest! {
        #[test]
        fn every_turn_in_any_field_order_names_the_first_turns_conversation(
            order in Just(vec!["messages", "model", "stream", "tools"]).prop_shuffle(),
            turns in proptest::collection::vec(0usize..40_000, 0..6),
        ) {
            let opening = [("system", "be brief"), ("user", "hi")];
            let id = conversation_id(&chat_in_order(&order, &opening));
            prop_assert!(id.is_some());
            let replies: Vec<String> = turns.iter().map(|n| "r".repeat(*n)).collect();
            let mut messages = opening.to_vec();
            for reply in &replies {
                messages.extend([("assistant", reply.as_str()), ("user", "and?")]);
            }
            let body = chat_in_order(&order, &messages);
            prop_assert_eq!(conversation_id(&body[..body.len().min(PREFIX_LIMIT)]), id);
        }

        #[test]
        fn any_bytes_name_a_conversation_or_nothing_without_panicking(
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = conversation_id(&body);
        }

        #[test]
        fn a_cut_past_the_first_user_message_names_the_whole_requests_conversation(cut in 0usize..200) {
            let body = chat("m", &[("system", "be brief"), ("user", "hi"), ("assistant", "hello")]);
            let cut = cut.min(body.len());
            let first_user_ends = body.windows(4).position(|w| w == br#""hi""#).unwrap() + 4;
            let named = conversation_id(&body[..cut]);
            if cut >= first_user_ends {
                prop_assert_eq!(named, conversation_id(&body));
            }
        }
    }

    #[test]
    fn what_is_not_a_chat_request_names_nothing() {
        for body in [
            &b""[..],
            b"not json",
            b"[1, 2]",
            br#"{"model": "m"}"#,
            br#"{"model": "m", "messages": "hi"}"#,
            br#"{"model": "m", "messages": [{"role": "assistant", "content": "x"}]}"#,
            br#"{"model": "m", "messages": [{"role": "user"}]}"#,
            &[0xff, 0xfe, 0x00][..],
        ] {
            assert_eq!(conversation_id(body), None, "{:?}", String::from_utf8_lossy(body));
        }
    }
}

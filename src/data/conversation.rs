//! One line of training data in the OpenAI chat fine-tuning format, parsed and checked.
//!
//! Two shapes are accepted:
//! - `{"messages": [...], "tools": [...]?}` with roles system / user / assistant / tool,
//!   assistant `tool_calls` whose `function.arguments` is a JSON *string*, `tool_call_id`
//!   on tool messages and an optional per-assistant `weight` of 0 or 1;
//! - `{"prompt": "...", "completion": "..."}`: a user turn and the assistant turn that is
//!   the only trained text.
//!
//! Other top-level keys (ids, timestamps, feedback: see [`super::feedback`]) are ignored.
//! Each `tool` message must answer an earlier assistant tool call: the one its
//! `tool_call_id` names or, without one, the oldest call not yet answered.
//!
//! Besides the typed view, each message keeps the exact object a chat template sees:
//! HF's convention, which the goldens follow, is the input dict with its keys in their
//! original order, `weight` removed and tool-call `arguments` parsed into JSON objects.
//! Values are `minijinja::Value`s, whose maps keep insertion order (Python dicts do, and
//! `tojson` must print keys in the order the data has them).

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::ValueKind;
use minijinja::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ToolCall {
    pub id: Option<String>,
    pub name: String,
    /// The parsed `arguments` (usually an object).
    pub arguments: Value,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub role: Role,
    /// Text content; text parts of a list-valued content are concatenated.
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
    /// False for an assistant message with `"weight": 0`: rendered, never trained.
    pub trained: bool,
    /// The message as the chat template receives it.
    pub template_value: Value,
}

#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The `tools` list, passed to the template unchanged.
    pub tools: Option<Value>,
}

impl Conversation {
    /// Whether some assistant message is trained (present and not `"weight": 0`): a
    /// conversation without one renders fine but has nothing to learn from.
    pub fn has_trained_output(&self) -> bool {
        self.messages.iter().any(|m| m.role == Role::Assistant && m.trained)
    }
}

/// Parses one JSONL line. The error says what is wrong; the caller adds `file:line`.
pub fn parse_line(line: &str) -> Result<Conversation> {
    parse_object(&decode_line(line)?)
}

/// Decodes one JSONL line into a JSON value whose maps keep the line's key order.
pub fn decode_line(line: &str) -> Result<Value> {
    serde_json::from_str(line).map_err(|e| anyhow!("invalid JSON: {e}"))
}

/// Parses a decoded line (see [`decode_line`]). Keys other than `messages`, `tools`,
/// `prompt` and `completion` (ids, timestamps, feedback...) are ignored here.
pub fn parse_object(root: &Value) -> Result<Conversation> {
    if root.kind() != ValueKind::Map {
        bail!("expected a JSON object, found {}", root.kind());
    }
    let messages = field(root, "messages");
    let prompt = field(root, "prompt");
    let completion = field(root, "completion");
    match (messages, prompt, completion) {
        (Some(messages), None, None) => {
            let tools = parse_tools(field(root, "tools"))?;
            Ok(Conversation { messages: parse_messages(&messages)?, tools })
        }
        (None, Some(prompt), Some(completion)) => prompt_completion(&prompt, &completion),
        (Some(_), _, _) => bail!("a line has either `messages` or `prompt`/`completion`, not both"),
        (None, Some(_), None) => bail!("`prompt` without `completion`"),
        (None, None, Some(_)) => bail!("`completion` without `prompt`"),
        (None, None, None) => {
            bail!("expected a `messages` list or `prompt` and `completion` strings")
        }
    }
}

/// A present key's value (a JSON `null` counts as present); `None` when absent.
pub(crate) fn field(obj: &Value, key: &str) -> Option<Value> {
    obj.get_attr(key).ok().filter(|v| !v.is_undefined())
}

fn entries(obj: &Value) -> Result<Vec<(Value, Value)>> {
    let mut out = Vec::new();
    for key in obj.try_iter()? {
        let value = obj.get_item(&key)?;
        out.push((key, value));
    }
    Ok(out)
}

fn items(seq: &Value) -> Result<Vec<Value>> {
    Ok(seq.try_iter()?.collect())
}

fn prompt_completion(prompt: &Value, completion: &Value) -> Result<Conversation> {
    let (Some(p), Some(c)) = (prompt.as_str(), completion.as_str()) else {
        bail!("`prompt` and `completion` must be strings");
    };
    let message = |role: Role, name: &str, text: &str| Message {
        role,
        content: Some(text.to_string()),
        tool_calls: Vec::new(),
        tool_call_id: None,
        trained: role == Role::Assistant,
        template_value: Value::from_pairs([("role", name), ("content", text)]),
    };
    Ok(Conversation {
        messages: vec![message(Role::User, "user", p), message(Role::Assistant, "assistant", c)],
        tools: None,
    })
}

fn parse_tools(tools: Option<Value>) -> Result<Option<Value>> {
    let Some(tools) = tools.filter(|t| !t.is_none()) else {
        return Ok(None);
    };
    if tools.kind() != ValueKind::Seq {
        bail!("`tools` must be a list, found {}", tools.kind());
    }
    for (i, tool) in items(&tools)?.iter().enumerate() {
        if tool.kind() != ValueKind::Map {
            bail!("tools[{i}] must be an object, found {}", tool.kind());
        }
    }
    Ok(Some(tools))
}

fn parse_messages(messages: &Value) -> Result<Vec<Message>> {
    if messages.kind() != ValueKind::Seq {
        bail!("`messages` must be a list, found {}", messages.kind());
    }
    let messages = items(messages)?;
    if messages.is_empty() {
        bail!("`messages` is empty");
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(m).with_context(|| format!("messages[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    check_tool_answers(&messages)?;
    Ok(messages)
}

/// Every `tool` message answers an earlier assistant tool call: the one whose `id` its
/// `tool_call_id` names, or, without a `tool_call_id`, the oldest one not yet answered.
fn check_tool_answers(messages: &[Message]) -> Result<()> {
    // (call id, answered) for each tool call seen so far, in order.
    let mut calls: Vec<(Option<&str>, bool)> = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        match msg.role {
            Role::Assistant => calls.extend(msg.tool_calls.iter().map(|c| (c.id.as_deref(), false))),
            Role::Tool => {
                let none_yet = calls.is_empty();
                let call = match msg.tool_call_id.as_deref() {
                    Some(id) => calls.iter_mut().find(|(c, _)| *c == Some(id)).ok_or_else(|| {
                        anyhow!(
                            "messages[{i}]: `tool_call_id` {id:?} matches no tool call of an earlier \
                             assistant message"
                        )
                    })?,
                    None => calls.iter_mut().find(|(_, answered)| !answered).ok_or_else(|| {
                        anyhow!(
                            "messages[{i}]: a `tool` message without `tool_call_id` must answer an \
                             earlier assistant tool call, but {}",
                            if none_yet { "there is none" } else { "all of them are answered" }
                        )
                    })?,
                };
                call.1 = true;
            }
            Role::System | Role::User => {}
        }
    }
    Ok(())
}

fn parse_message(msg: &Value) -> Result<Message> {
    if msg.kind() != ValueKind::Map {
        bail!("a message must be an object, found {}", msg.kind());
    }
    let role_value = field(msg, "role").ok_or_else(|| anyhow!("missing `role`"))?;
    let role_name = role_value.as_str().unwrap_or_default();
    let role = Role::parse(role_name).ok_or_else(|| {
        anyhow!("unknown role {role_value:?}; expected \"system\", \"user\", \"assistant\" or \"tool\"")
    })?;

    let content_value = field(msg, "content");
    let content = match &content_value {
        None => None,
        Some(v) => parse_content(v)?,
    };
    let tool_calls = match field(msg, "tool_calls").filter(|v| !v.is_none()) {
        None => Vec::new(),
        Some(_) if role != Role::Assistant => bail!("only assistant messages have `tool_calls`"),
        Some(calls) => parse_tool_calls(&calls)?,
    };
    if content.is_none() && (role != Role::Assistant || tool_calls.is_empty()) {
        bail!("`content` must be a string (null only for an assistant message with `tool_calls`)");
    }
    let tool_call_id = match field(msg, "tool_call_id").filter(|v| !v.is_none()) {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| anyhow!("`tool_call_id` must be a string"))?.to_string()),
    };
    let trained = match field(msg, "weight") {
        None => true,
        Some(w) if role != Role::Assistant => {
            bail!("`weight` is only allowed on assistant messages, got {w}")
        }
        Some(w) => parse_weight(&w)?,
    };

    Ok(Message {
        role,
        template_value: template_message(msg, content.as_deref(), &tool_calls)?,
        content,
        tool_calls,
        tool_call_id,
        trained,
    })
}

/// `content` as text: a string, `null`, or a list of `{"type": "text", "text": ...}`
/// parts, which are concatenated as OpenAI does.
fn parse_content(v: &Value) -> Result<Option<String>> {
    match v.kind() {
        ValueKind::None => Ok(None),
        ValueKind::String => Ok(v.as_str().map(str::to_string)),
        ValueKind::Seq => {
            let mut text = String::new();
            for (i, part) in items(v)?.iter().enumerate() {
                let kind = field(part, "type");
                if kind.as_ref().and_then(|k| k.as_str()) != Some("text") {
                    bail!("content[{i}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported");
                }
                let part_text = field(part, "text");
                let Some(t) = part_text.as_ref().and_then(|t| t.as_str()) else {
                    bail!("content[{i}]: `text` must be a string");
                };
                text.push_str(t);
            }
            Ok(Some(text))
        }
        kind => bail!("`content` must be a string, null or a list of text parts, found {kind}"),
    }
}

fn parse_weight(w: &Value) -> Result<bool> {
    if w.is_integer() {
        match i64::try_from(w.clone()) {
            Ok(0) => return Ok(false),
            Ok(1) => return Ok(true),
            _ => {}
        }
    }
    bail!("`weight` must be 0 or 1, got {w}")
}

fn parse_tool_calls(calls: &Value) -> Result<Vec<ToolCall>> {
    if calls.kind() != ValueKind::Seq {
        bail!("`tool_calls` must be a list, found {}", calls.kind());
    }
    items(calls)?
        .iter()
        .enumerate()
        .map(|(i, call)| parse_tool_call(call).with_context(|| format!("tool_calls[{i}]")))
        .collect()
}

fn parse_tool_call(call: &Value) -> Result<ToolCall> {
    if call.kind() != ValueKind::Map {
        bail!("a tool call must be an object, found {}", call.kind());
    }
    if let Some(kind) = field(call, "type") {
        if kind.as_str() != Some("function") {
            bail!("`type` must be \"function\", got {kind}");
        }
    }
    let id = match field(call, "id").filter(|v| !v.is_none()) {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| anyhow!("`id` must be a string"))?.to_string()),
    };
    let function = field(call, "function")
        .filter(|f| f.kind() == ValueKind::Map)
        .ok_or_else(|| anyhow!("missing `function` object"))?;
    let name = field(&function, "name")
        .and_then(|n| n.as_str().map(str::to_string))
        .ok_or_else(|| anyhow!("`function.name` must be a string"))?;
    let arguments = match field(&function, "arguments") {
        None => bail!("missing `function.arguments`"),
        Some(a) => match a.kind() {
            ValueKind::String => serde_json::from_str::<Value>(a.as_str().unwrap_or_default())
                .map_err(|e| anyhow!("`function.arguments` is not valid JSON: {e}"))?,
            // Data already in HF's shape (arguments as an object) is taken as is.
            ValueKind::Map => a,
            kind => bail!("`function.arguments` must be a JSON string, found {kind}"),
        },
    };
    Ok(ToolCall { id, name, arguments })
}

/// The message object for the template: every input key in order, minus `weight`, with
/// list content flattened to its text and each tool call's `arguments` parsed.
fn template_message(msg: &Value, content: Option<&str>, tool_calls: &[ToolCall]) -> Result<Value> {
    let mut out = Vec::new();
    for (key, value) in entries(msg)? {
        let value = match key.as_str() {
            Some("weight") => continue,
            Some("content") if value.kind() == ValueKind::Seq => Value::from(content.unwrap_or_default()),
            Some("tool_calls") if !tool_calls.is_empty() => {
                let calls = items(&value)?
                    .iter()
                    .zip(tool_calls)
                    .map(|(raw, parsed)| template_tool_call(raw, &parsed.arguments))
                    .collect::<Result<Vec<_>>>()?;
                Value::from(calls)
            }
            _ => value,
        };
        out.push((key, value));
    }
    Ok(Value::from_pairs(out))
}

fn template_tool_call(raw: &Value, arguments: &Value) -> Result<Value> {
    let mut out = Vec::new();
    for (key, value) in entries(raw)? {
        let value = if key.as_str() == Some("function") {
            let mut function = Vec::new();
            for (k, v) in entries(&value)? {
                let v = if k.as_str() == Some("arguments") { arguments.clone() } else { v };
                function.push((k, v));
            }
            Value::from_pairs(function)
        } else {
            value
        };
        out.push((key, value));
    }
    Ok(Value::from_pairs(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> String {
        format!("{:#}", parse_line(line).unwrap_err())
    }

    #[test]
    fn parses_tool_calls_and_keeps_key_order() {
        let line = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"z\": 1, \"a\": [2.5]}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "assistant", "content": "done", "weight": 0}]}"#;
        let conv = parse_line(line).unwrap();
        assert_eq!(conv.messages.len(), 4);
        let call = &conv.messages[1].tool_calls[0];
        assert_eq!(call.name, "f");
        let keys: Vec<String> = call.arguments.try_iter().unwrap().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["z", "a"]);
        let tv = &conv.messages[1].template_value;
        let args = tv.get_attr("tool_calls").unwrap().get_item_by_index(0).unwrap();
        let args = args.get_attr("function").unwrap().get_attr("arguments").unwrap();
        assert_eq!(args.kind(), ValueKind::Map);
        assert!(!conv.messages[3].trained);
        assert!(conv.messages[3].template_value.get_attr("weight").unwrap().is_undefined());
        assert_eq!(conv.messages[2].tool_call_id.as_deref(), Some("c1"));
    }

    #[test]
    fn prompt_completion_and_content_parts() {
        let conv = parse_line(r#"{"prompt": "2+2?", "completion": "4"}"#).unwrap();
        assert_eq!(conv.messages[0].role, Role::User);
        assert!(conv.messages[1].trained && conv.messages[1].role == Role::Assistant);
        let conv = parse_line(r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#).unwrap();
        assert_eq!(conv.messages[0].content.as_deref(), Some("ab"));
        assert_eq!(conv.messages[0].template_value.get_attr("content").unwrap().as_str(), Some("ab"));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(err("{\"messages\": [").starts_with("invalid JSON"));
        assert!(err("[1]").contains("expected a JSON object"));
        assert!(err(r#"{"messages": []}"#).contains("empty"));
        assert!(err(r#"{"messages": [{"role": "bot", "content": "x"}]}"#).contains("unknown role"));
        assert!(err(r#"{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}"#)
            .contains("`weight` must be 0 or 1, got 2"));
        assert!(
            err(r#"{"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]}"#).contains("weight")
        );
        assert!(err(r#"{"messages": [{"role": "user", "content": null}]}"#).contains("content"));
        let bad_args = r#"{"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}"#;
        let e = err(bad_args);
        assert!(
            e.contains("messages[0]") && e.contains("tool_calls[0]") && e.contains("not valid JSON"),
            "{e}"
        );
        assert!(err(r#"{"prompt": "x"}"#).contains("without `completion`"));
    }

    const CALL: &str = r#"{"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}"#;
    const CALL_NO_ID: &str = r#"{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}"#;

    fn with_messages(messages: &[&str]) -> String {
        format!(r#"{{"messages": [{{"role": "user", "content": "hi"}}, {}]}}"#, messages.join(", "))
    }

    #[test]
    fn tool_messages_answer_earlier_tool_calls() {
        let tool = |id: &str| format!(r#"{{"role": "tool", "tool_call_id": "{id}", "content": "ok"}}"#);
        let anon = r#"{"role": "tool", "content": "ok"}"#;
        assert!(parse_line(&with_messages(&[CALL, &tool("c1")])).is_ok());
        assert!(parse_line(&with_messages(&[CALL_NO_ID, anon])).is_ok());
        assert!(parse_line(&with_messages(&[CALL, anon])).is_ok());

        let e = err(&with_messages(&[CALL, &tool("c2")]));
        assert!(e.contains("messages[2]") && e.contains(r#""c2" matches no tool call"#), "{e}");
        // The call must come before its answer.
        let e = err(&with_messages(&[&tool("c1"), CALL]));
        assert!(e.contains("messages[1]") && e.contains("matches no tool call"), "{e}");
        let e = err(&with_messages(&[anon]));
        assert!(e.contains("messages[1]") && e.contains("there is none"), "{e}");
        let e = err(&with_messages(&[CALL_NO_ID, anon, anon]));
        assert!(e.contains("messages[3]") && e.contains("all of them are answered"), "{e}");
    }

    #[test]
    fn trained_output() {
        let conv = parse_line(r#"{"prompt": "a", "completion": "b"}"#).unwrap();
        assert!(conv.has_trained_output());
        let conv = parse_line(r#"{"messages": [{"role": "user", "content": "a"}]}"#).unwrap();
        assert!(!conv.has_trained_output());
        let line = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}"#;
        assert!(!parse_line(line).unwrap().has_trained_output());
    }
}

//! Tool calls in generated text, and whether they match the reference: same function
//! names in the same order, arguments equal as JSON values (object key order and
//! number spelling do not matter: `1`, `1.0` and `1e0` are equal). Text that should
//! hold a call but holds no valid JSON counts as wrong.

use serde_json::Value;

/// A function call: name and arguments (a JSON value, usually an object).
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

/// The calls in a model's output: Hermes/Qwen `<tool_call>{…}</tool_call>` blocks, or,
/// without them, the whole output as one JSON object (Llama 3.1 style, `parameters`
/// or `arguments`). `None` when the text holds a call that is not valid JSON, or no
/// call at all.
pub fn parse_calls(text: &str) -> Option<Vec<Call>> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let end = after.find(CLOSE).unwrap_or(after.len());
        calls.push(call_from_json(after[..end].trim())?);
        rest = &after[(end + CLOSE.len()).min(after.len())..];
    }
    if calls.is_empty() {
        let t = text.trim();
        if t.starts_with('{') {
            calls.push(call_from_json(t)?);
        }
    }
    (!calls.is_empty()).then_some(calls)
}

fn call_from_json(s: &str) -> Option<Call> {
    let v: Value = serde_json::from_str(s).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let mut arguments = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(Value::Null);
    // some models write the arguments as a JSON string, as the OpenAI format stores them
    if let Value::String(s) = &arguments {
        arguments = serde_json::from_str(s).ok()?;
    }
    Some(Call { name, arguments })
}

/// JSON equality with numbers compared by value and objects by key set.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

/// Every reference call made, in order, with equal arguments, and nothing else.
pub fn calls_match(generated: &[Call], reference: &[Call]) -> bool {
    generated.len() == reference.len()
        && generated
            .iter()
            .zip(reference)
            .all(|(g, r)| g.name == r.name && json_equal(&g.arguments, &r.arguments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: Value) -> Call {
        Call { name: name.into(), arguments: args }
    }

    #[test]
    fn argument_order_and_number_spelling_do_not_matter() {
        let r = [call("refund", json!({"order_id": "A17", "amount": 12.5, "items": [1, 2]}))];
        let g = parse_calls(
            "<tool_call>\n{\"name\": \"refund\", \"arguments\": {\"items\": [1.0, 2e0], \"amount\": 12.50, \"order_id\": \"A17\"}}\n</tool_call>",
        )
        .unwrap();
        assert!(calls_match(&g, &r));
    }

    #[test]
    fn wrong_values_names_and_counts_fail() {
        let r = [call("refund", json!({"order_id": "A17", "amount": 12.5}))];
        let other_amount = parse_calls(
            r#"<tool_call>{"name": "refund", "arguments": {"order_id": "A17", "amount": 12.6}}</tool_call>"#,
        )
        .unwrap();
        assert!(!calls_match(&other_amount, &r));
        let string_amount = parse_calls(r#"<tool_call>{"name": "refund", "arguments": {"order_id": "A17", "amount": "12.5"}}</tool_call>"#).unwrap();
        assert!(!calls_match(&string_amount, &r), "a string is not a number");
        let extra_key = parse_calls(r#"<tool_call>{"name": "refund", "arguments": {"order_id": "A17", "amount": 12.5, "x": 1}}</tool_call>"#).unwrap();
        assert!(!calls_match(&extra_key, &r));
        let other_name = parse_calls(r#"<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A17", "amount": 12.5}}</tool_call>"#).unwrap();
        assert!(!calls_match(&other_name, &r));
        let twice = parse_calls(&format!(
            "{0}{0}",
            r#"<tool_call>{"name": "refund", "arguments": {"order_id": "A17", "amount": 12.5}}</tool_call>"#
        ))
        .unwrap();
        assert!(!calls_match(&twice, &r));
    }

    #[test]
    fn invalid_json_counts_as_no_call() {
        assert!(parse_calls(r#"<tool_call>{"name": "refund", "arguments": {"order_id": "A17",</tool_call>"#)
            .is_none());
        assert!(parse_calls("<tool_call>not json</tool_call>").is_none());
        assert!(parse_calls("Sure, I will refund it.").is_none());
        assert!(parse_calls(r#"{"name": 3}"#).is_none());
    }

    #[test]
    fn llama_style_and_string_arguments_parse() {
        let g = parse_calls(r#" {"name": "lookup_order", "parameters": {"order_id": "B2"}} "#).unwrap();
        assert_eq!(g, vec![call("lookup_order", json!({"order_id": "B2"}))]);
        let g = parse_calls(
            r#"<tool_call>{"name": "lookup_order", "arguments": "{\"order_id\": \"B2\"}"}</tool_call>"#,
        )
        .unwrap();
        assert_eq!(g, vec![call("lookup_order", json!({"order_id": "B2"}))]);
    }
}

//! The data pipeline against HF transformers' `apply_chat_template` goldens
//! (tests/fixtures/chat-goldens, see its README): rendered text, token ids and labels
//! must be identical for every (model, conversation) pair.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tuneloop::data::{self, ChatModel, Tokenized};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-goldens")
}

struct Golden {
    line: usize,
    model: String,
    conversation: usize,
    text: String,
    input_ids: Vec<u32>,
    labels: Vec<i64>,
}

fn goldens() -> Vec<Golden> {
    let text = std::fs::read_to_string(fixtures().join("expected.jsonl")).expect("read expected.jsonl");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).expect("expected.jsonl line");
            Golden {
                line: i + 1,
                model: v["model"].as_str().expect("model").to_string(),
                conversation: v["conversation"].as_u64().expect("conversation") as usize,
                text: v["text"].as_str().expect("text").to_string(),
                input_ids: serde_json::from_value(v["input_ids"].clone()).expect("input_ids"),
                labels: serde_json::from_value(v["labels"].clone()).expect("labels"),
            }
        })
        .collect()
}

/// Describes the first position where `want` and `got` differ, naming the token there
/// (from `got_ids`) and showing a few neighbours; `None` when they are equal.
fn first_difference(
    model: &ChatModel,
    what: &str,
    want: &[i64],
    got: &[i64],
    got_ids: &[u32],
) -> Option<String> {
    let at = match want.iter().zip(got).position(|(w, g)| w != g) {
        Some(i) => i,
        None if want.len() == got.len() => return None,
        None => want.len().min(got.len()),
    };
    let token = got_ids.get(at).and_then(|&id| model.tokenizer.id_to_token(id));
    let window = |v: &[i64]| v[at.saturating_sub(3)..(at + 4).min(v.len())].to_vec();
    Some(format!(
        "{what} differ at token {at} (token text {token:?}; lengths want {} got {}): want {:?}, got {:?}; \
         around it want {:?}, got {:?}",
        want.len(),
        got.len(),
        want.get(at),
        got.get(at),
        window(want),
        window(got),
    ))
}

fn check(model: &ChatModel, g: &Golden, got: &Tokenized) -> Vec<String> {
    let mut problems = Vec::new();
    if got.text != g.text {
        let at = g.text.chars().zip(got.text.chars()).position(|(a, b)| a != b).unwrap_or(0);
        let around = |s: &str| s.chars().skip(at.saturating_sub(20)).take(40).collect::<String>();
        problems.push(format!(
            "text differs at char {at}: want {:?}, got {:?}",
            around(&g.text),
            around(&got.text)
        ));
    }
    let widen = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
    let (want_ids, got_ids) = (widen(&g.input_ids), widen(&got.input_ids));
    problems.extend(first_difference(model, "input_ids", &want_ids, &got_ids, &got.input_ids));
    problems.extend(first_difference(model, "labels", &g.labels, &got.labels, &got.input_ids));
    problems
}

#[test]
fn reproduces_hf_chat_template_goldens() {
    let conversations: Vec<String> = std::fs::read_to_string(fixtures().join("conversations.jsonl"))
        .expect("read conversations.jsonl")
        .lines()
        .map(str::to_string)
        .collect();
    let mut models: HashMap<String, ChatModel> = HashMap::new();
    let goldens = goldens();
    let mut failures = Vec::new();
    for g in &goldens {
        if !models.contains_key(&g.model) {
            let model = ChatModel::load(&fixtures().join(&g.model)).expect("load model folder");
            models.insert(g.model.clone(), model);
        }
        let model = &models[&g.model];
        let label = format!("expected.jsonl:{} ({} / conversation {})", g.line, g.model, g.conversation);
        let conv = match data::parse_line(&conversations[g.conversation]) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{label}: parse failed: {e:#}"));
                continue;
            }
        };
        match data::tokenize_conversation(model, &conv) {
            Ok(got) => failures.extend(check(model, g, &got).into_iter().map(|p| format!("{label}: {p}"))),
            Err(e) => failures.push(format!("{label}: {e:#}")),
        }
    }
    println!("{} of {} golden lines matched", goldens.len() - failures.len(), goldens.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// `inspect` (the `tuneloop data inspect --json` backend) gives the goldens' ids and
/// labels, one line per conversation, in order.
#[test]
fn inspect_prints_golden_ids_and_labels() {
    let mut out = Vec::new();
    data::inspect(&fixtures().join("chatml-tools"), &fixtures().join("conversations.jsonl"), &mut out)
        .expect("inspect");
    let out = String::from_utf8(out).expect("utf-8");
    let want: Vec<Golden> = goldens().into_iter().filter(|g| g.model == "chatml-tools").collect();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), want.len());
    for (line, g) in lines.iter().zip(&want) {
        let v: serde_json::Value = serde_json::from_str(line).expect("inspect line is JSON");
        let ids: Vec<u32> = serde_json::from_value(v["input_ids"].clone()).expect("input_ids");
        let labels: Vec<i64> = serde_json::from_value(v["labels"].clone()).expect("labels");
        assert_eq!(ids, g.input_ids, "conversation {}", g.conversation);
        assert_eq!(labels, g.labels, "conversation {}", g.conversation);
    }
}

fn inspect_error(lines: &[&str]) -> (String, String) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    for line in lines {
        writeln!(file, "{line}").expect("write");
    }
    let mut out = Vec::new();
    let err = data::inspect(&fixtures().join("chatml-tools"), file.path(), &mut out).expect_err("must fail");
    (format!("{err:#}"), file.path().display().to_string())
}

const GOOD: &str =
    r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

#[test]
fn malformed_json_line_is_named() {
    let (err, path) = inspect_error(&[GOOD, r#"{"messages": [{"role": "user""#]);
    assert!(err.starts_with(&format!("{path}:2: invalid JSON")), "{err}");
}

#[test]
fn invalid_tool_call_arguments_are_named() {
    let bad = r#"{"messages": [{"role": "user", "content": "refund"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "refund", "arguments": "{\"order_id\": "}}]}]}"#;
    let (err, path) = inspect_error(&[GOOD, GOOD, bad]);
    assert!(err.starts_with(&format!("{path}:3: ")), "{err}");
    assert!(err.contains("arguments") && err.contains("not valid JSON"), "{err}");
}

#[test]
fn weight_other_than_0_or_1_is_rejected() {
    let bad = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 2}]}"#;
    let (err, path) = inspect_error(&[bad]);
    assert!(err.starts_with(&format!("{path}:1: ")), "{err}");
    assert!(err.contains("`weight` must be 0 or 1"), "{err}");
}

#[test]
fn weight_zero_and_prompt_completion_train_only_what_they_should() {
    let model = ChatModel::load(&fixtures().join("llama3")).expect("load");
    let untrained = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]}"#;
    let t =
        data::tokenize_conversation(&model, &data::parse_line(untrained).expect("parse")).expect("tokenize");
    assert!(t.labels.iter().all(|&l| l == data::IGNORE_INDEX));

    let pc = r#"{"prompt": "What is 2+2?", "completion": "4"}"#;
    let t = data::tokenize_conversation(&model, &data::parse_line(pc).expect("parse")).expect("tokenize");
    let trained: Vec<u32> = t
        .input_ids
        .iter()
        .zip(&t.labels)
        .filter(|(_, &l)| l != data::IGNORE_INDEX)
        .map(|(&id, _)| id)
        .collect();
    let text = model.tokenizer.decode(&trained, false).expect("decode");
    assert_eq!(text, "4<|eot_id|>");
    assert!(t.text.starts_with("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?"));
}

/// The CLI, `tuneloop data inspect --json`, on every conversation each golden model
/// covers: its lines equal expected.jsonl's ids and labels.
#[test]
fn cli_data_inspect_reproduces_expected_jsonl() {
    let dir = fixtures();
    let convs: Vec<String> = std::fs::read_to_string(dir.join("conversations.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let expected: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut checked = 0;
    for model in ["chatml-tools", "chatml-generation", "llama3"] {
        let rows: Vec<&serde_json::Value> = expected.iter().filter(|e| e["model"] == model).collect();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("in.jsonl");
        let picked: Vec<&str> =
            rows.iter().map(|e| convs[e["conversation"].as_u64().unwrap() as usize].as_str()).collect();
        std::fs::write(&data, picked.join("\n")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tuneloop"))
            .args(["data", "inspect", "--json", "--model"])
            .arg(dir.join(model))
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), rows.len(), "{model}");
        for (got, want) in lines.iter().zip(&rows) {
            assert_eq!(got["input_ids"], want["input_ids"], "{model} conversation {}", want["conversation"]);
            assert_eq!(got["labels"], want["labels"], "{model} conversation {}", want["conversation"]);
            checked += 1;
        }
    }
    assert_eq!(checked, expected.len());
}

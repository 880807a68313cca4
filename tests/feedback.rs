//! Ingestion of agent logs with feedback (`data::feedback`): bad lines named by
//! `file:line`, the filters and their counts, deduplication, the deterministic split,
//! and the bundled quickstart logs.

use std::io::Write;
use std::path::{Path, PathBuf};
use tuneloop::data::feedback::{self, Example, FeedbackFilter, Format, Loaded};
use tuneloop::data::{tokenize_conversation, ChatModel, IGNORE_INDEX};
use tuneloop::recipe::{DataFormat, Filters};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A JSONL file with these lines, kept alive as long as the value.
struct Jsonl {
    file: tempfile::NamedTempFile,
}

impl Jsonl {
    fn new(lines: &[&str]) -> Jsonl {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for line in lines {
            writeln!(file, "{line}").expect("write");
        }
        Jsonl { file }
    }

    fn path(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }
}

fn load(files: &[&Jsonl], format: Format, filter: &FeedbackFilter, dedup: bool) -> anyhow::Result<Loaded> {
    let paths: Vec<PathBuf> = files.iter().map(|f| f.path()).collect();
    feedback::load(&paths, format, filter, dedup)
}

fn load_all(lines: &[&str]) -> Loaded {
    load(&[&Jsonl::new(lines)], Format::Auto, &FeedbackFilter::default(), false).expect("load")
}

/// A chat record asking about `order`, with `extra` top-level keys (`"rating": 5, ...`).
fn chat(order: u32, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    format!(
        r#"{{"messages": [{{"role": "user", "content": "Where is order A{order}?"}}, {{"role": "assistant", "content": "Order A{order} has shipped."}}]{sep}{extra}}}"#
    )
}

const TOOLS_OK: &str = r#"{"id": "t1", "messages": [{"role": "user", "content": "Where is A1?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": "{\"order_id\": \"A1\"}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "shipped"}, {"role": "assistant", "content": "It has shipped."}]}"#;

/// Loads `bad` as the third line of a file (after two good ones) and returns the error
/// and the file's path.
fn error_on_line_3(bad: &str) -> (String, String) {
    let (a, b) = (chat(1, ""), chat(2, r#""rating": 4"#));
    let file = Jsonl::new(&[&a, &b, bad, &chat(3, "")]);
    let err = load(&[&file], Format::Auto, &FeedbackFilter::default(), true).expect_err("must fail");
    (format!("{err:#}"), file.path().display().to_string())
}

#[test]
fn every_bad_line_is_named_by_file_and_line() {
    let cases: &[(&str, &str)] = &[
        (r#"{"messages": [{"role": "user", "content": "x"}"#, "invalid JSON"),
        (
            r#"{"messages": [{"role": "customer", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
            "unknown role",
        ),
        (
            &TOOLS_OK.replace(r#""tool_call_id": "c1""#, r#""tool_call_id": "c9""#),
            r#"messages[2]: `tool_call_id` "c9" matches no tool call of an earlier assistant message"#,
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "y"}]}"#,
            "messages[1]: a `tool` message without `tool_call_id` must answer an earlier assistant tool call",
        ),
        (r#"{"messages": [], "rating": 5}"#, "`messages` is empty"),
        (r#"{"messages": [{"role": "user", "content": "x"}]}"#, "no assistant message to train on"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}"#,
            "no assistant message to train on",
        ),
        (&chat(7, r#""rating": "5""#), r#"`rating` must be a number, got "5""#),
        (&chat(7, r#""rating": true"#), "`rating` must be a number, got true"),
        (&chat(7, r#""feedback": "meh""#), r#"`feedback` must be "up" or "down", got "meh""#),
        (&chat(7, r#""feedback": 1"#), r#"`feedback` must be "up" or "down", got 1"#),
        (&chat(7, r#""thumbs_up": "yes""#), r#"`thumbs_up` must be true or false, got "yes""#),
        (&chat(7, r#""thumbs_up": true, "feedback": "down""#), "disagree"),
    ];
    for (bad, want) in cases {
        let (err, path) = error_on_line_3(bad);
        assert!(err.starts_with(&format!("{path}:3: ")), "{bad}\n  gave: {err}");
        assert!(err.contains(want), "{bad}\n  gave: {err}\n  want: {want}");
    }
}

#[test]
fn errors_name_the_file_they_are_in_and_skip_blank_lines() {
    let good = Jsonl::new(&[&chat(1, ""), TOOLS_OK]);
    let bad =
        Jsonl::new(&[&chat(2, ""), "", "   ", r#"{"prompt": "x", "completion": "y", "rating": null}"#, "{"]);
    let err = load(&[&good, &bad], Format::Auto, &FeedbackFilter::default(), false).expect_err("must fail");
    let err = format!("{err:#}");
    assert!(err.starts_with(&format!("{}:5: invalid JSON", bad.path().display())), "{err}");

    let missing = feedback::load(
        &[PathBuf::from("/nonexistent/log.jsonl")],
        Format::Auto,
        &FeedbackFilter::default(),
        false,
    )
    .expect_err("must fail");
    assert!(format!("{missing:#}").contains("/nonexistent/log.jsonl"), "{missing:#}");
}

#[test]
fn metadata_and_null_feedback_are_tolerated() {
    let loaded = load_all(&[
        &chat(1, r#""id": "a-1", "timestamp": "2025-03-14T08:00:00Z", "agent": "x", "meta": {"k": [1]}"#),
        &chat(2, r#""rating": null, "thumbs_up": null, "feedback": null"#),
        &chat(3, r#""rating": 4.5, "thumbs_up": true, "feedback": "up""#),
        r#"{"prompt": "2+2?", "completion": "4", "feedback": "down", "id": 7}"#,
        TOOLS_OK,
    ]);
    assert_eq!(loaded.summary.kept, 5);
    let e = &loaded.examples;
    assert_eq!((e[0].rating, e[0].thumbs), (None, None));
    assert_eq!((e[1].rating, e[1].thumbs), (None, None));
    assert_eq!((e[2].rating, e[2].thumbs), (Some(4.5), Some(true)));
    assert_eq!((e[3].rating, e[3].thumbs), (None, Some(false)));
    assert_eq!(e[4].source.1, 5);
    assert_eq!(e[4].conv.messages.len(), 4);
    assert_eq!(loaded.summary.kept_rated, 1);
    assert_eq!(loaded.summary.kept_thumbs, 2);
    assert_eq!(loaded.summary.kept_without_feedback, 3);
}

#[test]
fn filters_drop_low_ratings_and_thumbs_down_and_count_them() {
    let lines = [
        chat(1, r#""rating": 5"#),
        chat(2, r#""rating": 2"#),
        chat(3, r#""rating": 3"#),
        chat(4, r#""rating": 2.99"#),
        chat(5, r#""thumbs_up": false"#),
        chat(6, r#""feedback": "down""#),
        chat(7, r#""feedback": "up""#),
        chat(8, ""),
        // Low rating and thumbs down: counted once, as a low rating.
        chat(9, r#""rating": 1, "thumbs_up": false"#),
        chat(10, r#""rating": 4, "feedback": "down""#),
    ];
    let file = Jsonl::new(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let orders = |loaded: &Loaded| -> Vec<usize> { loaded.examples.iter().map(|e| e.source.1).collect() };

    let none = load(&[&file], Format::Auto, &FeedbackFilter::default(), true).expect("load");
    assert_eq!(orders(&none), (1..=10).collect::<Vec<_>>());

    let min3 = FeedbackFilter { min_rating: Some(3.0), ..FeedbackFilter::default() };
    let loaded = load(&[&file], Format::Auto, &min3, true).expect("load");
    assert_eq!(orders(&loaded), [1, 3, 5, 6, 7, 8, 10]);
    assert_eq!(loaded.summary.dropped.low_rating, 3);
    assert_eq!(loaded.summary.dropped.thumbs_down, 0);

    let down = FeedbackFilter { drop_thumbs_down: true, ..FeedbackFilter::default() };
    let loaded = load(&[&file], Format::Auto, &down, true).expect("load");
    assert_eq!(orders(&loaded), [1, 2, 3, 4, 7, 8]);
    assert_eq!(loaded.summary.dropped.thumbs_down, 4);

    let both = FeedbackFilter { min_rating: Some(3.0), drop_thumbs_down: true, max_tokens: Some(16) };
    let loaded = load(&[&file], Format::Auto, &both, true).expect("load");
    assert_eq!(orders(&loaded), [1, 3, 7, 8]);
    let s = &loaded.summary;
    assert_eq!((s.lines_read, s.kept, s.dropped.low_rating, s.dropped.thumbs_down), (10, 4, 3, 3));
    assert_eq!(s.lines_read, s.kept + s.dropped.total());
    assert_eq!((s.kept_rated, s.kept_thumbs, s.kept_without_feedback), (2, 1, 1));
}

#[test]
fn formats_drop_other_shapes_as_wrong_format() {
    let pc = r#"{"prompt": "2+2?", "completion": "4"}"#;
    let pc_rated = r#"{"prompt": "3+3?", "completion": "6", "rating": 5}"#;
    let chat_plain = chat(1, "");
    let chat_rated = chat(2, r#""thumbs_up": true"#);
    let file = Jsonl::new(&[pc, pc_rated, &chat_plain, &chat_rated]);
    let kept = |format: Format| -> (Vec<usize>, usize) {
        let loaded = load(&[&file], format, &FeedbackFilter::default(), true).expect("load");
        (loaded.examples.iter().map(|e| e.source.1).collect(), loaded.summary.dropped.wrong_format)
    };
    assert_eq!(kept(Format::Auto), (vec![1, 2, 3, 4], 0));
    assert_eq!(kept(Format::Chat), (vec![3, 4], 2));
    assert_eq!(kept(Format::PromptCompletion), (vec![1, 2], 2));
    assert_eq!(kept(Format::Feedback), (vec![2, 4], 2));

    // Every line is checked, including those of a format that is then dropped.
    let bad = Jsonl::new(&[&chat_plain, r#"{"prompt": "x", "completion": "y", "rating": "high"}"#]);
    let err = load(&[&bad], Format::Chat, &FeedbackFilter::default(), true).expect_err("must fail");
    assert!(format!("{err:#}").contains(":2: `rating` must be a number"), "{err:#}");

    for (name, format) in [
        ("auto", Format::Auto),
        ("chat", Format::Chat),
        ("prompt_completion", Format::PromptCompletion),
        ("feedback", Format::Feedback),
    ] {
        assert_eq!(name.parse::<Format>().expect("parse"), format);
        assert_eq!(format.to_string(), name);
    }
    assert_eq!("prompt-completion".parse::<Format>().expect("parse"), Format::PromptCompletion);
    assert!("openai".parse::<Format>().is_err());
    // The recipe's `data.format` and `data.filters` carry over.
    assert_eq!(Format::from(DataFormat::PromptCompletion), Format::PromptCompletion);
    let filters = Filters { min_rating: Some(2.5), drop_thumbs_down: false, max_tokens: Some(9) };
    let want = FeedbackFilter { min_rating: Some(2.5), drop_thumbs_down: false, max_tokens: Some(9) };
    assert_eq!(FeedbackFilter::from(&filters), want);
}

#[test]
fn identical_conversations_are_deduplicated_keeping_the_first() {
    let same_pc_as_chat = r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": "b"}"#;
    // The same conversation with other keys in another order and other metadata.
    let reordered = r#"{"rating": 5, "messages": [{"content": "Where is order A1?", "role": "user"}, {"content": "Order A1 has shipped.", "role": "assistant"}]}"#;
    let untrained = r#"{"messages": [{"role": "user", "content": "Where is order A1?"}, {"role": "assistant", "content": "Order A1 has shipped.", "weight": 0}, {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]}"#;
    let lines = [
        chat(1, r#""id": "a", "timestamp": "t1""#),
        chat(2, ""),
        chat(1, r#""id": "a-retry", "timestamp": "t2", "feedback": "up""#),
        reordered.to_string(),
        r#"{"prompt": "2+2?", "completion": "4", "id": "a"}"#.to_string(),
        same_pc_as_chat.to_string(),
        chat(2, ""),
        untrained.to_string(),
        // A different tools list makes a different conversation.
        chat(2, r#""tools": [{"type": "function", "function": {"name": "f"}}]"#),
        chat(2, r#""tools": []"#),
    ];
    let file = Jsonl::new(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let loaded = load(&[&file], Format::Auto, &FeedbackFilter::default(), true).expect("load");
    let kept: Vec<usize> = loaded.examples.iter().map(|e| e.source.1).collect();
    assert_eq!(kept, [1, 2, 5, 8, 9]);
    assert_eq!(loaded.summary.dropped.duplicate, 5);
    assert_eq!(loaded.examples[0].thumbs, None, "the first copy is kept, with its own feedback");

    let all = load(&[&file], Format::Auto, &FeedbackFilter::default(), false).expect("load");
    assert_eq!(all.examples.len(), lines.len());
    assert_eq!(all.summary.dropped.duplicate, 0);
    assert_eq!(all.examples[0].hash, all.examples[2].hash);
    assert_eq!(all.examples[0].hash, all.examples[3].hash);
    assert_eq!(all.examples[4].hash, all.examples[5].hash);
    assert_ne!(all.examples[0].hash, all.examples[7].hash);

    // Duplicates across files, and a dropped first copy does not hide a later good one.
    let first = Jsonl::new(&[&chat(1, r#""rating": 1"#), &chat(2, "")]);
    let second = Jsonl::new(&[&chat(1, r#""rating": 5"#), &chat(2, r#""rating": 5"#)]);
    let min3 = FeedbackFilter { min_rating: Some(3.0), ..FeedbackFilter::default() };
    let loaded = load(&[&first, &second], Format::Auto, &min3, true).expect("load");
    let kept: Vec<(PathBuf, usize)> = loaded.examples.iter().map(|e| e.source.clone()).collect();
    assert_eq!(kept, [(first.path(), 2), (second.path(), 1)]);
    let s = &loaded.summary;
    assert_eq!((s.files, s.lines_read, s.kept, s.dropped.low_rating, s.dropped.duplicate), (2, 4, 2, 1, 1));
}

#[test]
fn content_hash_is_sha256_of_canonical_json() {
    // Pinned: the same on every machine and run. Made with Python:
    // hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
    // ensure_ascii=False).encode()) with `arguments` parsed into an object.
    let line = r#"{"id": "x", "rating": 5, "messages": [{"role": "user", "content": "Where is order A1?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": "{\"order_id\": \"A1\", \"n\": 2.5}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "shipped"}, {"role": "assistant", "content": "It has shipped. \u2713"}]}"#;
    let loaded = load_all(&[line]);
    let example = &loaded.examples[0];
    assert_eq!(
        feedback::canonical_json(&example.conv),
        r#"{"messages":[{"content":"Where is order A1?","role":"user"},{"content":null,"role":"assistant","tool_calls":[{"function":{"arguments":{"n":2.5,"order_id":"A1"},"name":"lookup_order"},"id":"c1","type":"function"}]},{"content":"shipped","role":"tool","tool_call_id":"c1"},{"content":"It has shipped. ✓","role":"assistant"}]}"#
    );
    assert_eq!(example.hash_hex(), "265ff8a076d0933f7312c2de0fe3e1f7eac74b0fb3f44fa39e0afbc97c78bea5");
    assert_eq!(example.hash, feedback::content_hash(&example.conv));
    assert_eq!(example.split_key(), 0x265ff8a076d0933f);
}

fn sides(train: &[Example], val: &[Example]) -> (Vec<[u8; 32]>, Vec<[u8; 32]>) {
    (train.iter().map(|e| e.hash).collect(), val.iter().map(|e| e.hash).collect())
}

#[test]
fn split_is_deterministic_and_independent_of_other_lines() {
    let lines: Vec<String> = (0..400).map(|i| chat(i, "")).collect();
    let file = Jsonl::new(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let examples = load(&[&file], Format::Auto, &FeedbackFilter::default(), true).expect("load").examples;

    let (train, val) = feedback::split(examples.clone(), 0.2);
    assert_eq!(train.len() + val.len(), 400);
    assert!((50..=110).contains(&val.len()), "{} of 400 in validation", val.len());
    assert!(train.windows(2).all(|w| w[0].source.1 < w[1].source.1), "order is kept");
    assert!(val.iter().all(|e| (e.split_key() as f64) < 0.2 * 2f64.powi(64)));

    let (train2, val2) = feedback::split(examples.clone(), 0.2);
    assert_eq!(sides(&train, &val), sides(&train2, &val2));

    // Half the lines, shuffled among new ones: each keeps its side.
    let mut other: Vec<String> = (1000..1300).map(|i| chat(i, r#""rating": 5"#)).collect();
    other.extend(lines.iter().step_by(2).cloned());
    other.reverse();
    let file = Jsonl::new(&other.iter().map(String::as_str).collect::<Vec<_>>());
    let more = load(&[&file], Format::Auto, &FeedbackFilter::default(), true).expect("load").examples;
    let (_, val3) = feedback::split(more, 0.2);
    let val3: std::collections::HashSet<[u8; 32]> = val3.iter().map(|e| e.hash).collect();
    for (i, example) in examples.iter().enumerate().step_by(2) {
        let in_val = val.iter().any(|v| v.hash == example.hash);
        assert_eq!(val3.contains(&example.hash), in_val, "line {} changed sides", i + 1);
    }

    let (train, val) = feedback::split(examples.clone(), 0.0);
    assert_eq!((train.len(), val.len()), (400, 0));
    let (train, val) = feedback::split(examples.clone(), 1.0);
    assert_eq!((train.len(), val.len()), (0, 400));
    let (train, _) = feedback::split(examples, f64::NAN);
    assert_eq!(train.len(), 400);
}

#[test]
fn summary_renders_as_a_table_and_serializes() {
    let lines = [chat(1, r#""rating": 1"#), chat(2, r#""feedback": "down""#), chat(3, ""), chat(3, "")];
    let file = Jsonl::new(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let filter = FeedbackFilter { min_rating: Some(3.0), drop_thumbs_down: true, max_tokens: None };
    let mut summary = load(&[&file], Format::Auto, &filter, true).expect("load").summary;
    let text = summary.to_string();
    assert!(text.starts_with("1 file\n"), "{text}");
    for (name, count) in [
        ("lines read", 4),
        ("kept", 1),
        ("dropped", 3),
        ("wrong format", 0),
        ("low rating", 1),
        ("thumbs down", 1),
        ("duplicate", 1),
        ("too long", 0),
    ] {
        let row = text.lines().find(|l| l.trim_start().starts_with(name));
        let cells = row.map(|l| l.split("  ").filter(|c| !c.is_empty()).map(str::trim).collect::<Vec<_>>());
        assert_eq!(cells, Some(vec![name, &count.to_string()]), "row {name:?} in\n{text}");
    }
    let json = serde_json::to_value(&summary).expect("serialize");
    assert_eq!(json["lines_read"], 4);
    assert_eq!(json["dropped"]["low_rating"], 1);
    assert_eq!(json["dropped"]["duplicate"], 1);

    summary.record_too_long(1);
    assert_eq!((summary.kept, summary.dropped.too_long), (0, 1));
    assert_eq!(summary.lines_read, summary.kept + summary.dropped.total());
}

/// The quickstart's bundled agent logs: what the default filters keep, and every kept
/// conversation fits the quickstart model's context once tokenized.
#[test]
fn quickstart_logs_load_with_the_expected_summary() {
    let dir = repo().join("configs/quickstart");
    let model = ChatModel::load(&dir.join("tokenizer")).expect("quickstart tokenizer");
    let filter = FeedbackFilter { min_rating: Some(3.0), drop_thumbs_down: true, max_tokens: Some(256) };
    // (file, lines, kept, low rating, thumbs down, duplicate)
    let expected = [("feedback.jsonl", 240, 200, 8, 27, 5), ("feedback-day2.jsonl", 80, 64, 2, 13, 1)];
    let mut all = Vec::new();
    for (name, lines, kept, low, down, dup) in expected {
        let path = dir.join(name);
        let loaded = feedback::load(std::slice::from_ref(&path), Format::Auto, &filter, true).expect("load");
        let s = &loaded.summary;
        println!("{name}:\n{s}");
        assert_eq!(
            (s.lines_read, s.kept, s.dropped.low_rating, s.dropped.thumbs_down, s.dropped.duplicate),
            (lines, kept, low, down, dup),
            "{name}"
        );
        assert_eq!(s.dropped.wrong_format, 0);

        let mut lengths = Vec::new();
        for example in &loaded.examples {
            let t = tokenize_conversation(&model, &example.conv).expect("tokenize");
            assert!(t.labels.iter().any(|&l| l != IGNORE_INDEX));
            lengths.push(t.input_ids.len());
        }
        lengths.sort_unstable();
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        println!(
            "{name}: kept conversations' tokens: min {} median {} mean {mean:.1} p90 {} max {}",
            lengths[0],
            lengths[lengths.len() / 2],
            lengths[lengths.len() * 9 / 10],
            lengths[lengths.len() - 1]
        );
        assert!(lengths[lengths.len() - 1] <= 256, "{name}: longest {}", lengths[lengths.len() - 1]);

        let (train, val) = feedback::split(loaded.examples.clone(), 0.2);
        println!("{name}: split 0.2 -> {} train, {} validation", train.len(), val.len());
        assert!(!val.is_empty() && train.len() > val.len());
        all.push(path);
    }

    // The second day adds new conversations only.
    let both = feedback::load(&all, Format::Auto, &filter, true).expect("load both");
    assert_eq!(both.summary.kept, 264);
    assert_eq!(both.summary.dropped.duplicate, 6);
}

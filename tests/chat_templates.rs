//! Chat templates chosen on the command line (--chat-template NAME, --chat-template-file FILE) and
//! `qwen-run template`, through the real binary and server; the built-in qwen2.5 template against
//! the real 0.5B model's own.

mod common;

use qwen_run::gguf::Value;
use qwen_run_kernels::QuantType;
use serde_json::json;
use std::path::{Path, PathBuf};

use common::server::Server;

fn qwen_run(args: &[&str]) -> (i32, String, String) {
    common::qwen_run_with_input(args, "")
}

/// The tiny model with `template` as its tokenizer.chat_template (None: without one).
fn tiny_with_template(dir: &Path, name: &str, template: Option<&str>) -> PathBuf {
    let mut w = common::tiny_model_writer(QuantType::Q8_0);
    match template {
        Some(t) => w.meta("tokenizer.chat_template", Value::String(t.into())),
        None => w.remove_meta("tokenizer.chat_template"),
    };
    let p = dir.join(name);
    w.write(&p).unwrap();
    p
}

/// A conversation with everything Qwen2.5's template renders: a system prompt, tools, an
/// assistant turn with two tool calls (arguments as OpenAI's JSON string and as an object),
/// their two results, an answer and a new question.
fn tool_conversation() -> serde_json::Value {
    json!({
        "messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
            ]},
            {"role": "tool", "tool_call_id": "a", "content": "{\"temp_c\": 18}"},
            {"role": "tool", "tool_call_id": "b", "content": "{\"temp_c\": 24}"},
            {"role": "assistant", "content": "Paris: 18 °C, Rome: 24 °C."},
            {"role": "user", "content": "And <Berlin>?"}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }}]
    })
}

#[test]
fn builtin_qwen25_renders_as_the_real_models_template() {
    let Ok(model) = std::env::var("QWEN_RUN_MODEL_0_5B") else {
        eprintln!("QWEN_RUN_MODEL_0_5B is not set: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv.json");
    std::fs::write(&conv, tool_conversation().to_string()).unwrap();
    let no_system = dir.path().join("no-system.json");
    let mut v = tool_conversation();
    v["messages"].as_array_mut().unwrap().remove(0);
    std::fs::write(&no_system, v.to_string()).unwrap();
    let plain = dir.path().join("plain.json");
    std::fs::write(
        &plain,
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "system", "content": "late"}]).to_string(),
    )
    .unwrap();
    for messages in [&conv, &no_system, &plain] {
        for gen in [&[][..], &["--no-generation-prompt"]] {
            let base = [
                "template",
                "-m",
                &model,
                "--messages",
                messages.to_str().unwrap(),
            ];
            let own = qwen_run(&[&base[..], gen].concat());
            let builtin = qwen_run(&[&base[..], gen, &["--chat-template", "qwen2.5"]].concat());
            assert_eq!(own.0, 0, "{}", own.2);
            assert_eq!(builtin.0, 0, "{}", builtin.2);
            assert_eq!(own.1, builtin.1, "{messages:?} {gen:?}");
            assert!(own.2.contains("tokenizer.chat_template of"), "{}", own.2);
            assert!(
                builtin.2.contains("the built-in chat template 'qwen2.5'"),
                "{}",
                builtin.2
            );
        }
    }
    let (_, text, _) = qwen_run(&[
        "template",
        "-m",
        &model,
        "--messages",
        conv.to_str().unwrap(),
    ]);
    assert!(text.contains("<tools>\n{\"type\": \"function\""), "{text}");
    assert!(text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "{text}");
    assert!(text.contains("<|im_start|>user\n<tool_response>\n{\"temp_c\": 18}\n</tool_response>\n<tool_response>\n{\"temp_c\": 24}\n</tool_response><|im_end|>\n"), "{text}");
    assert!(
        text.ends_with("<|im_start|>user\nAnd <Berlin>?<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
}

#[test]
fn chatml_replaces_the_models_template() {
    let dir = tempfile::tempdir().unwrap();
    let odd = "{%- for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
    let p = tiny_with_template(dir.path(), "odd.gguf", Some(odd));
    let m = p.to_str().unwrap();
    let (code, own, _) = qwen_run(&["template", "-m", m]);
    assert_eq!(code, 0);
    assert!(
        own.starts_with("[system] You are a helpful assistant.\n[user] Hello!"),
        "{own}"
    );
    let (code, chatml, err) = qwen_run(&["template", "-m", m, "--chat-template", "chatml"]);
    assert_eq!(code, 0, "{err}");
    assert!(chatml.starts_with("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"), "{chatml}");
    assert!(chatml.ends_with("<|im_start|>assistant\n"), "{chatml}");
    assert!(err.contains("the built-in chat template 'chatml'"), "{err}");
    // The same text from a file, and as --chat-template's own value.
    let file = dir.path().join("chatml.jinja");
    std::fs::write(&file, qwen_run::tokenizer::BUILTIN_TEMPLATES[0].1).unwrap();
    let (_, from_file, err) = qwen_run(&[
        "template",
        "-m",
        m,
        "--chat-template-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(from_file, chatml);
    assert!(err.contains("chatml.jinja (--chat-template-file)"), "{err}");
    let (_, inline, _) = qwen_run(&[
        "template",
        "-m",
        m,
        "--chat-template",
        qwen_run::tokenizer::BUILTIN_TEMPLATES[0].1,
    ]);
    assert_eq!(inline, chatml);
    // The tokens are the text's: the model sees what `template` prints.
    let (code, ids, _) = qwen_run(&["template", "-m", m, "--chat-template", "chatml", "--tokens"]);
    assert_eq!(code, 0);
    let ids: Vec<u32> = serde_json::from_str(&ids).unwrap();
    assert!(ids.len() > 10, "{ids:?}");
    // `run` generates from the override: the tiny model runs with either.
    for t in ["chatml", "qwen2.5"] {
        let (code, _, err) = qwen_run(&[
            "-m",
            m,
            "-p",
            "hi",
            "-n",
            "2",
            "-c",
            "256",
            "-t",
            "1",
            "--chat-template",
            t,
            "--no-prompt-cache",
        ]);
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn an_override_rescues_a_model_with_a_broken_or_missing_template() {
    let dir = tempfile::tempdir().unwrap();
    let broken = tiny_with_template(
        dir.path(),
        "broken.gguf",
        Some("{% for m in messages %}{{ m.content"),
    );
    let b = broken.to_str().unwrap();
    let (code, _, err) = qwen_run(&[
        "-m",
        b,
        "-p",
        "hi",
        "-n",
        "1",
        "-c",
        "256",
        "--no-prompt-cache",
    ]);
    assert_eq!(code, 1);
    for needle in [
        "the model's chat template (tokenizer.chat_template of",
        "broken.gguf",
        "does not parse",
        "syntax error",
        "--chat-template NAME",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    let (code, _, err) = qwen_run(&[
        "-m",
        b,
        "-p",
        "hi",
        "-n",
        "1",
        "-c",
        "256",
        "-t",
        "1",
        "--no-prompt-cache",
        "--chat-template",
        "qwen2.5",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, text, _) = qwen_run(&["template", "-m", b, "--chat-template", "chatml"]);
    assert_eq!(code, 0);
    assert!(text.starts_with("<|im_start|>system\n"));
    // Without a template the model gets ChatML, and says so.
    let none = tiny_with_template(dir.path(), "none.gguf", None);
    let (code, text, err) = qwen_run(&["template", "-m", none.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(text.starts_with("<|im_start|>system\n"));
    assert!(
        err.contains("'chatml' (") && err.contains("none.gguf has no tokenizer.chat_template"),
        "{err}"
    );
}

#[test]
fn template_reads_messages_and_tools() {
    let m = common::shared_tiny_model().to_str().unwrap();
    let t = "{{ messages | length }} {{ messages[-1].role }}:{{ messages[-1].content }} tools={{ tools | length if tools else 0 }} gen={{ add_generation_prompt }}";
    // An array on stdin; OpenAI's content parts and the developer role are taken as the server takes them.
    let (code, out, err) = common::qwen_run_with_input(
        &[
            "template",
            "-m",
            m,
            "--messages",
            "-",
            "--chat-template",
            t,
            "--no-generation-prompt",
        ],
        r#"[{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]"#,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "2 user:ab tools=0 gen=False");
    // An object with messages and tools, as a chat completion request holds them.
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv.json");
    std::fs::write(&conv, tool_conversation().to_string()).unwrap();
    let (code, out, err) = qwen_run(&[
        "template",
        "-m",
        m,
        "--messages",
        conv.to_str().unwrap(),
        "--chat-template",
        t,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "7 user:And <Berlin>? tools=1 gen=True");
    // --tools with an array of messages.
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, tool_conversation()["tools"].to_string()).unwrap();
    let list = dir.path().join("list.json");
    std::fs::write(&list, tool_conversation()["messages"].to_string()).unwrap();
    let (code, out, _) = qwen_run(&[
        "template",
        "-m",
        m,
        "--messages",
        list.to_str().unwrap(),
        "--tools",
        tools.to_str().unwrap(),
        "--chat-template",
        t,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, "7 user:And <Berlin>? tools=1 gen=True");
    // Refusals: tools twice, not JSON, not messages, tools not an array.
    for (args, stdin, needle) in [
        (
            vec![
                "--messages",
                conv.to_str().unwrap(),
                "--tools",
                tools.to_str().unwrap(),
            ],
            "",
            "the tools are given twice",
        ),
        (
            vec!["--messages", "-"],
            "[{",
            "--messages - is not valid JSON",
        ),
        (
            vec!["--messages", "-"],
            r#"{"msgs": []}"#,
            "has no \"messages\" array",
        ),
        (
            vec!["--messages", "-"],
            r#"[{"content": "no role"}]"#,
            "missing field `role`",
        ),
        (
            vec!["--messages", "-"],
            r#"[{"role": "user", "content": [{"type": "image_url"}]}]"#,
            "content parts of type 'image_url' are not supported",
        ),
        (
            vec![
                "--messages",
                list.to_str().unwrap(),
                "--tools",
                conv.to_str().unwrap(),
            ],
            "",
            "the tools must be a JSON array",
        ),
    ] {
        let mut a = vec!["template", "-m", m];
        a.extend(args);
        let (code, _, err) = common::qwen_run_with_input(&a, stdin);
        assert_eq!(code, 1, "{a:?}: {err}");
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
}

#[test]
fn serve_renders_with_the_override_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("strict.jinja");
    std::fs::write(
        &t,
        "{%- for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns here') }}{% endif %}\n{%- if m.content == 'bug' %}{{ m.content.missing.deeper }}{% endif %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}{{- '<|im_start|>assistant\\n' }}",
    )
    .unwrap();
    let s = Server::start(
        common::shared_tiny_model(),
        &[
            "-t",
            "1",
            "-c",
            "256",
            "--chat-template-file",
            t.to_str().unwrap(),
        ],
    );
    let (status, v) = s.post("/api/show", &json!({"model": "tiny-Q8_0"}));
    assert_eq!(status, 200);
    assert!(
        v["template"]
            .as_str()
            .unwrap()
            .contains("no system turns here"),
        "{v}"
    );
    let chat = |content: &str, role: &str| {
        s.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": role, "content": content}], "max_tokens": 2, "temperature": 0}),
        )
    };
    let (status, v) = chat("hello", "user");
    assert_eq!(status, 200, "{v}");
    // The template refuses the conversation: the client's to fix.
    let (status, v) = chat("hello", "system");
    assert_eq!(status, 400, "{v}");
    let msg = v.to_string();
    assert!(
        msg.contains(
            "strict.jinja (--chat-template-file) refuses this conversation: no system turns here"
        ),
        "{msg}"
    );
    // The template fails: the server's.
    let (status, v) = chat("bug", "user");
    assert_eq!(status, 500, "{v}");
    let msg = v.to_string();
    assert!(
        msg.contains("strict.jinja") && msg.contains("undefined value") && msg.contains("line 2"),
        "{msg}"
    );
    // Ollama's generate renders through the same template.
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "tiny-Q8_0", "prompt": "hi", "system": "x", "stream": false}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("no system turns here"), "{v}");
}

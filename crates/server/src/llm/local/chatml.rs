//! The ChatML prompt format SmolLM2-Instruct was trained on.
//!
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n`
//! for the model to continue. The markers are encoded as control tokens; message contents
//! are encoded as plain text, so a user cannot close a turn or forge a system message by
//! typing the markers.
//!
//! Unlike the model's bundled Jinja template, no default system prompt ("You are a helpful
//! AI assistant named SmolLM...") is added when none is given: measured here, the 135M model
//! answers "What is the capital of France?" correctly without it and with French nonsense
//! with it. Apex's agents always send their own system prompt.

use super::tokenizer::Tokenizer;
use crate::llm::ChatMessage;

/// Builds the prompt token ids for `messages`, ending with the assistant's turn.
pub fn encode_chat(tokenizer: &Tokenizer, messages: &[ChatMessage]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut push_turn = |role: &str, content: &str| {
        ids.extend(tokenizer.encode("<|im_start|>", true));
        ids.extend(tokenizer.encode(&format!("{role}\n"), false));
        ids.extend(tokenizer.encode(content, false));
        ids.extend(tokenizer.encode("<|im_end|>", true));
        ids.extend(tokenizer.encode("\n", false));
    };
    for message in messages {
        let role = match message.role.as_str() {
            "system" | "user" | "assistant" => message.role.as_str(),
            _ => "user",
        };
        push_turn(role, &message.content);
    }
    ids.extend(tokenizer.encode("<|im_start|>", true));
    ids.extend(tokenizer.encode("assistant\n", false));
    ids
}

/// The same prompt as text (for logs and tests).
pub fn render_chat(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml() {
        let text = render_chat(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")]);
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}

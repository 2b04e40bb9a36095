//! Measures the local model's generation speed: one user, then N concurrent users.
//!
//! `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 cargo run --release -p apex-server --example llm_bench -- [MODEL] [TOKENS] [USERS]`
//! (defaults: `data/models/SmolLM2-135M-Instruct.Q4_1.gguf`, 128 tokens, 4 users; one
//! inference thread, greedy decoding; the two variables are what `apex` sets for itself).
//! The prompts ask for long answers so runs seldom stop early. Reports decode speed (generated tokens per second, prompt processing excluded)
//! and, for the concurrent case, the aggregate over the wall-clock time of the whole batch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use apex_server::llm::local::{LocalOptions, LocalProvider};
use apex_server::llm::{ChatMessage, LlmRequest};
use tokio_util::sync::CancellationToken;

const PROMPTS: [&str; 4] = [
    "Write a detailed essay about the history of the bicycle.",
    "Explain in detail how a city water system works, step by step.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Describe in detail how to plan a vegetable garden for a whole year.",
];

fn request(prompt: &str, tokens: u32) -> LlmRequest {
    LlmRequest::new(
        vec![ChatMessage::user(prompt)],
        serde_json::Value::Null,
        tokens,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let tokens: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let users: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);

    let started = Instant::now();
    let provider = Arc::new(LocalProvider::load(&model, LocalOptions::default())?);
    println!("model loaded in {:.2} s", started.elapsed().as_secs_f64());

    // Warm-up.
    provider
        .generate(request(PROMPTS[0], 8), CancellationToken::new())
        .await?;

    println!("\n1 user, {tokens} tokens, 3 runs:");
    for prompt in PROMPTS.iter().take(3) {
        let (_, stats) = provider
            .generate(request(prompt, tokens), CancellationToken::new())
            .await?;
        println!(
            "  prompt {} tok in {:.3} s ({:.0} tok/s); generated {} tok at {:.1} tok/s",
            stats.prompt_tokens,
            stats.prefill_seconds,
            stats.prompt_tokens as f64 / stats.prefill_seconds,
            stats.completion_tokens,
            (stats.completion_tokens.saturating_sub(1)) as f64 / stats.decode_seconds
        );
    }

    println!("\n{users} concurrent users, {tokens} tokens each:");
    let wall = Instant::now();
    let tasks: Vec<_> = (0..users)
        .map(|i| {
            let provider = Arc::clone(&provider);
            let prompt = PROMPTS[i % PROMPTS.len()];
            tokio::spawn(async move {
                provider
                    .generate(request(prompt, tokens), CancellationToken::new())
                    .await
            })
        })
        .collect();
    let mut total = 0u32;
    for task in tasks {
        let (_, stats) = task.await??;
        total += stats.completion_tokens;
        println!(
            "  user: {} tok, first token after {:.2} s, then {:.1} tok/s",
            stats.completion_tokens,
            stats.prefill_seconds,
            (stats.completion_tokens.saturating_sub(1)) as f64 / stats.decode_seconds
        );
    }
    let seconds = wall.elapsed().as_secs_f64();
    println!(
        "  aggregate: {total} tokens in {seconds:.2} s = {:.1} tok/s (prompt processing included)",
        total as f64 / seconds
    );
    Ok(())
}

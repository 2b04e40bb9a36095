//! Measures the local model's generation speed at several levels of concurrency.
//!
//! `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 cargo run --release -p apex-server --example llm_bench -- [MODEL] [TOKENS] [LEVELS]`
//! (defaults: `data/models/SmolLM2-135M-Instruct.Q4_1.gguf`, 128 tokens, levels `1,4,8,16`;
//! one inference thread, greedy decoding; the two variables are what `apex` sets for
//! itself). At each level that many requests are submitted at once and the bench reports
//! the aggregate generated tokens per second over the wall-clock time of the whole level
//! (prompt processing included) and each request's first-token latency, measured from its
//! submission (queueing and prompt processing included). The prompts ask for long answers
//! so runs seldom stop early.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use apex_server::llm::local::{LocalOptions, LocalProvider};
use apex_server::llm::{ChatMessage, LlmRequest};
use tokio_util::sync::CancellationToken;

const PROMPTS: [&str; 8] = [
    "Write a detailed essay about the history of the bicycle.",
    "Explain in detail how a city water system works, step by step.",
    "Write a long story about a lighthouse keeper and a storm.",
    "Describe in detail how to plan a vegetable garden for a whole year.",
    "Explain how a steam engine works and how it changed the world.",
    "Write a long letter from a sailor to his family about his travels.",
    "Describe in detail how bread is made, from the field to the table.",
    "Explain step by step how to learn to play the piano as an adult.",
];

fn request(prompt: &str, tokens: u32) -> LlmRequest {
    LlmRequest::new(
        vec![ChatMessage::user(prompt)],
        serde_json::Value::Null,
        tokens,
    )
}

/// The value at quantile `q` of sorted `values`.
fn quantile(values: &[f64], q: f64) -> f64 {
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index.min(values.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let tokens: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let levels: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,4,8,16".to_owned())
        .split(',')
        .map(|level| level.trim().parse())
        .collect::<Result<_, _>>()?;

    let loaded = Instant::now();
    let provider = Arc::new(LocalProvider::load(&model, LocalOptions::default())?);
    println!("model loaded in {:.2} s", loaded.elapsed().as_secs_f64());

    // Warm-up.
    provider
        .generate(request(PROMPTS[0], 8), CancellationToken::new())
        .await?;

    println!("\n{tokens} tokens per request");
    println!("concurrent | aggregate tok/s | per-request tok/s | first token p50 / max (s)");
    let mut single_stream = None;
    for users in levels {
        let wall = Instant::now();
        let tasks: Vec<_> = (0..users)
            .map(|i| {
                let provider = Arc::clone(&provider);
                let prompt = PROMPTS[i % PROMPTS.len()];
                tokio::spawn(async move {
                    let submitted = Instant::now();
                    let result = provider
                        .generate(request(prompt, tokens), CancellationToken::new())
                        .await;
                    (submitted.elapsed().as_secs_f64(), result)
                })
            })
            .collect();
        let mut total = 0u32;
        let mut first_token = Vec::with_capacity(users);
        let mut per_request = Vec::with_capacity(users);
        for task in tasks {
            let (elapsed, result) = task.await?;
            let (_, stats) = result?;
            total += stats.completion_tokens;
            // The decode phase ends when the request does, so what came before it is the
            // wait for the first token.
            first_token.push(elapsed - stats.decode_seconds);
            per_request
                .push(stats.completion_tokens.saturating_sub(1) as f64 / stats.decode_seconds);
        }
        let seconds = wall.elapsed().as_secs_f64();
        let aggregate = total as f64 / seconds;
        first_token.sort_by(f64::total_cmp);
        per_request.sort_by(f64::total_cmp);
        let single = *single_stream.get_or_insert(aggregate);
        println!(
            "{users:>10} | {aggregate:>9.1} ({:.2}×) | {:>17.1} | {:.3} / {:.3}",
            aggregate / single,
            quantile(&per_request, 0.5),
            quantile(&first_token, 0.5),
            quantile(&first_token, 1.0),
        );
    }
    Ok(())
}

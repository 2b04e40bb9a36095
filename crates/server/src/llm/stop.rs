//! Stop sequences over a [`TextStream`], for every provider.
//!
//! A small model asked about a prompt that contains labels ("Question:", "Answer:") or chat
//! markers tends to write them back and go on with an invented next turn. The answer ends
//! where the first stop sequence begins: text that might be the start of one is held back
//! until the next chunk decides, and once a stop appears the inner stream is dropped (for
//! the local model that ends the generation, since the engine stops a sequence whose reader
//! is gone).

use futures_util::StreamExt;

use super::TextStream;

/// Ends `stream` before the first occurrence of any of `stops`.
pub fn stop_at(stream: TextStream, stops: Vec<String>) -> TextStream {
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if stops.is_empty() {
        return stream;
    }
    let state = (Some(stream), String::new(), stops);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut inner, mut held, stops)| async move {
            loop {
                let source = inner.as_mut()?;
                match source.next().await {
                    Some(Ok(chunk)) => {
                        held.push_str(&chunk);
                        if let Some(at) = first_stop(&held, &stops) {
                            held.truncate(at);
                            // The rest is never read: drop the provider's stream now.
                            return (!held.is_empty())
                                .then(|| (Ok(held), (None, String::new(), stops)));
                        }
                        let keep = partial_stop_len(&held, &stops);
                        let ready = held.len() - keep;
                        if ready > 0 {
                            let rest = held.split_off(ready);
                            return Some((Ok(held), (inner, rest, stops)));
                        }
                    }
                    Some(Err(err)) => return Some((Err(err), (None, String::new(), stops))),
                    None => {
                        return (!held.is_empty()).then(|| (Ok(held), (None, String::new(), stops)))
                    }
                }
            }
        },
    ))
}

/// Byte offset of the earliest stop sequence in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop sequence
/// (always on a character boundary, since the stops are whole strings).
fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    let mut longest = 0;
    for stop in stops {
        for (end, _) in stop.char_indices().skip(1) {
            if end > longest && text.ends_with(&stop[..end]) {
                longest = end;
            }
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::LlmError;

    async fn collect(chunks: &[&str], stops: &[&str]) -> Vec<String> {
        let items: Vec<Result<String, LlmError>> =
            chunks.iter().map(|c| Ok(c.to_string())).collect();
        let stream: TextStream = Box::pin(futures_util::stream::iter(items));
        stop_at(stream, stops.iter().map(|s| s.to_string()).collect())
            .map(|r| r.unwrap())
            .collect()
            .await
    }

    #[tokio::test]
    async fn text_ends_before_a_stop_split_across_chunks() {
        let out = collect(
            &["You spent a lot.\nQue", "stion: how", " much?"],
            &["Question:"],
        )
        .await;
        assert_eq!(out.concat(), "You spent a lot.\n");
    }

    #[tokio::test]
    async fn a_held_back_prefix_that_is_not_a_stop_is_released() {
        let out = collect(&["Ask a Que", "en about it"], &["Question:"]).await;
        assert_eq!(out.concat(), "Ask a Queen about it");
        assert_eq!(out[0], "Ask a ", "the possible start of a stop waits");
    }

    #[tokio::test]
    async fn chat_markers_end_the_answer() {
        let out = collect(&["Done.<|im_", "start|>user\nmore"], &["<|im_start|>"]).await;
        assert_eq!(out.concat(), "Done.");
    }
}

//! The model's tokenizer, built from the GGUF file's own metadata.
//!
//! SmolLM2 uses a GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`, pre-tokenizer
//! `smollm`). Everything needed is in the GGUF metadata: the vocabulary
//! (`tokenizer.ggml.tokens`), the merge list (`tokenizer.ggml.merges`), the token types
//! (`tokenizer.ggml.token_type`, 3 = control token such as `<|im_start|>`) and the
//! BOS/EOS ids. No hub file is needed.
//!
//! Encoding: control tokens are split out first (only where the caller allows them, so user
//! text can never inject `<|im_end|>`), then the `smollm` pre-tokenizer splits every digit
//! into its own piece and applies the GPT-2 split pattern
//! (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`), each
//! piece's bytes are mapped to the GPT-2 byte alphabet, and merges are applied lowest rank
//! first. Decoding reverses the byte mapping; [`StreamDecoder`] emits only whole UTF-8
//! characters so streamed text never contains half a character.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`...).
const TOKEN_TYPE_CONTROL: u32 = 3;
/// GGUF token type of user-defined tokens, also matched literally.
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
}

fn meta_err(message: impl Into<String>) -> TokenizerError {
    TokenizerError::Metadata(message.into())
}

/// A byte-level BPE tokenizer. Immutable once built; shared by all requests.
#[derive(Debug)]
pub struct Tokenizer {
    /// Token id to its byte-level string (GPT-2 alphabet), or its literal text for control tokens.
    tokens: Vec<String>,
    /// Byte-level string to token id.
    ids: HashMap<String, u32>,
    /// (left, right) to (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Control and user-defined tokens, longest first, matched literally when allowed.
    specials: Vec<(String, u32)>,
    is_special: Vec<bool>,
    /// Byte value to its single-character token id. A vocabulary may lack bytes that never
    /// occur in its training text (0xC0, 0xF5..=0xFF, some control characters); such bytes
    /// are dropped when encoding.
    byte_tokens: [Option<u32>; 256],
    /// GPT-2 alphabet character to byte value.
    char_to_byte: HashMap<char, u8>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

/// The GPT-2 byte-to-unicode table: printable bytes map to themselves, the rest to 256+n.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (b'!'..=b'~').contains(&(b as u8))
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        let code = if printable {
            b as u32
        } else {
            let code = next;
            next += 1;
            code
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

fn string_array(content: &gguf_file::Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    let value = content
        .metadata
        .get(key)
        .ok_or_else(|| meta_err(format!("missing `{key}`")))?;
    let items = value
        .to_vec()
        .map_err(|_| meta_err(format!("`{key}` is not an array")))?;
    items
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| meta_err(format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn optional_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let model = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| meta_err("missing `tokenizer.ggml.model`"))?;
        if model != "gpt2" {
            return Err(meta_err(format!(
                "tokenizer model {model:?} is not supported (expected byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = string_array(content, "tokenizer.ggml.tokens")?;
        let merges = string_array(content, "tokenizer.ggml.merges")?;
        let types: Vec<u32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(value) => value
                .to_vec()
                .map_err(|_| meta_err("`tokenizer.ggml.token_type` is not an array"))?
                .iter()
                .map(|v| v.to_u32().or_else(|_| v.to_i32().map(|i| i as u32)))
                .collect::<Result<_, _>>()
                .map_err(|_| meta_err("`tokenizer.ggml.token_type` holds a non-integer"))?,
            None => vec![1; tokens.len()],
        };
        let mut tokenizer = Self::new(tokens, &merges, &types)?;
        tokenizer.bos_id = optional_u32(content, "tokenizer.ggml.bos_token_id");
        tokenizer.eos_id = optional_u32(content, "tokenizer.ggml.eos_token_id");
        Ok(tokenizer)
    }

    /// Builds a tokenizer from a vocabulary, merges ("left right") and GGUF token types.
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        types: &[u32],
    ) -> Result<Self, TokenizerError> {
        if types.len() != tokens.len() {
            return Err(meta_err("token types and tokens differ in length"));
        }
        let n = u32::try_from(tokens.len()).map_err(|_| meta_err("vocabulary too large"))?;
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let alphabet = byte_alphabet();
        let mut byte_tokens = [None; 256];
        for (b, c) in alphabet.iter().enumerate() {
            byte_tokens[b] = ids.get(&c.to_string()).copied();
        }
        if byte_tokens.iter().filter(|t| t.is_some()).count() < 200 {
            return Err(meta_err(
                "the vocabulary is not byte-level (most single-byte tokens are missing)",
            ));
        }
        let char_to_byte = alphabet
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let (left, right) = merge
                .split_once(' ')
                .ok_or_else(|| meta_err(format!("merge {merge:?} has no space")))?;
            let (Some(&l), Some(&r), Some(&m)) = (
                ids.get(left),
                ids.get(right),
                ids.get(&format!("{left}{right}")),
            ) else {
                // A merge whose parts are not all in the vocabulary can never apply.
                continue;
            };
            merge_map.entry((l, r)).or_insert((rank as u32, m));
        }
        let is_special: Vec<bool> = types
            .iter()
            .map(|t| *t == TOKEN_TYPE_CONTROL || *t == TOKEN_TYPE_USER_DEFINED)
            .collect();
        let mut specials: Vec<(String, u32)> = (0..n)
            .filter(|&i| is_special[i as usize] && !tokens[i as usize].is_empty())
            .map(|i| (tokens[i as usize].clone(), i))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Ok(Self {
            tokens,
            ids,
            merges: merge_map,
            specials,
            is_special,
            byte_tokens,
            char_to_byte,
            bos_id: None,
            eos_id: None,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token given by its exact vocabulary string (e.g. `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// Encodes `text`. With `allow_special`, literal control-token text (`<|im_start|>`)
    /// becomes that token; without, it is encoded as ordinary text.
    pub fn encode(&self, text: &str, allow_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if !allow_special {
            self.encode_ordinary(text, &mut out);
            return out;
        }
        let mut rest = text;
        while !rest.is_empty() {
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|pos| (pos, s.len(), *id)))
                // Earliest match; on a tie the longest (specials are sorted longest first).
                .min_by_key(|(pos, _, _)| *pos);
            match next {
                Some((pos, len, id)) => {
                    self.encode_ordinary(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    self.encode_ordinary(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        for piece in pre_tokenize(text) {
            self.bpe(piece, out);
        }
    }

    /// Byte-level BPE of one pre-tokenized piece.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = piece
            .bytes()
            .filter_map(|b| self.byte_tokens[b as usize])
            .collect();
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, pair)| {
                    self.merges
                        .get(&(pair[0], pair[1]))
                        .map(|(rank, merged)| (*rank, i, *merged))
                })
                .min();
            let Some((_, i, merged)) = best else { break };
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        out.extend(symbols);
    }

    /// The bytes a token stands for; control tokens give their literal text unless
    /// `skip_special`, in which case they give nothing.
    pub fn token_bytes(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        let Some(token) = self.tokens.get(id as usize) else {
            return;
        };
        if self.is_special(id) {
            if !skip_special {
                out.extend_from_slice(token.as_bytes());
            }
            return;
        }
        for c in token.chars() {
            match self.char_to_byte.get(&c) {
                Some(b) => out.push(*b),
                // Not a byte-level token (should not happen in a gpt2 vocabulary): keep as is.
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }

    /// Decodes ids to text (invalid UTF-8 is replaced).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for id in ids {
            self.token_bytes(*id, skip_special, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Turns a stream of token ids into text, emitting only complete UTF-8 characters.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        tokenizer.token_bytes(id, true, &mut self.pending);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(err) => match err.error_len() {
                // Incomplete character at the end: keep it for the next token.
                None => err.valid_up_to(),
                // Truly invalid bytes: emit them replaced, do not stall.
                Some(_) => self.pending.len(),
            },
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    /// Whatever is left (an unfinished character), replaced.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_whitespace() {
        Class::Space
    } else if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else {
        Class::Other
    }
}

/// The `smollm` pre-tokenizer: each digit alone, then the GPT-2 pattern on the rest.
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c.is_numeric() {
            gpt2_split(&text[start..i], &mut pieces);
            pieces.push(&text[i..i + c.len_utf8()]);
            start = i + c.len_utf8();
        }
    }
    gpt2_split(&text[start..], &mut pieces);
    pieces
}

/// Splits like `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn gpt2_split<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |i: usize| chars.get(i).map_or(text.len(), |(pos, _)| *pos);
    let run = |from: usize, class_wanted: Class| {
        let mut j = from;
        while j < chars.len() && class(chars[j].1) == class_wanted {
            j += 1;
        }
        j
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        // Contractions.
        if c == '\'' {
            let rest = &text[chars[i].0 + 1..];
            let len = ["re", "ve", "ll"]
                .iter()
                .find(|s| rest.starts_with(*s))
                .map(|_| 2)
                .or_else(|| {
                    ["s", "t", "m", "d"]
                        .iter()
                        .find(|s| rest.starts_with(*s))
                        .map(|_| 1)
                });
            if let Some(len) = len {
                out.push(&text[chars[i].0..end_of(i + 1 + len)]);
                i += 1 + len;
                continue;
            }
        }
        // An optional single space, then a run of letters, numbers or other symbols.
        let (lead, first) = match chars.get(i + 1) {
            Some((_, next)) if c == ' ' && class(*next) != Class::Space => (1, *next),
            _ => (0, c),
        };
        let first_class = class(first);
        if first_class != Class::Space {
            let j = run(i + lead, first_class);
            out.push(&text[chars[i].0..end_of(j)]);
            i = j;
            continue;
        }
        // Whitespace: the run, minus its last character when non-space follows.
        let j = run(i, Class::Space);
        let j = if j < chars.len() && j - i >= 2 {
            j - 1
        } else {
            j
        };
        out.push(&text[chars[i].0..end_of(j)]);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizer_follows_the_gpt2_pattern() {
        assert_eq!(pre_tokenize("Hello world"), vec!["Hello", " world"]);
        assert_eq!(pre_tokenize("a   b"), vec!["a", "  ", " b"]);
        assert_eq!(pre_tokenize("a\n\nb"), vec!["a", "\n", "\n", "b"]);
        assert_eq!(
            pre_tokenize("it's 42!"),
            vec!["it", "'s", " ", "4", "2", "!"]
        );
        assert_eq!(pre_tokenize("end  "), vec!["end", "  "]);
        assert_eq!(pre_tokenize("$56.79"), vec!["$", "5", "6", ".", "7", "9"]);
        assert_eq!(pre_tokenize(" ?!x"), vec![" ?!", "x"]);
    }

    fn toy() -> Tokenizer {
        let alphabet = byte_alphabet();
        let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        tokens.extend(["he", "ll", "hell", "hello", "Ġw", "<|end|>"].map(String::from));
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w"].map(String::from);
        let mut types = vec![1; tokens.len()];
        *types.last_mut().unwrap() = TOKEN_TYPE_CONTROL;
        Tokenizer::new(tokens, &merges, &types).unwrap()
    }

    #[test]
    fn applies_merges_and_control_tokens() {
        let t = toy();
        let hello = t.token_id("hello").unwrap();
        let end = t.token_id("<|end|>").unwrap();
        let ids = t.encode("hello<|end|>", true);
        assert_eq!(ids, vec![hello, end]);
        let plain = t.encode("hello<|end|>", false);
        assert!(
            !plain.contains(&end),
            "user text cannot produce control tokens"
        );
        assert_eq!(t.decode(&plain, false), "hello<|end|>");
        assert_eq!(t.decode(&ids, true), "hello");
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let t = toy();
        let ids = t.encode("é€", false);
        let mut decoder = StreamDecoder::default();
        let mut out = String::new();
        for id in ids {
            let piece = decoder.push(&t, id);
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&decoder.finish());
        assert_eq!(out, "é€");
    }
}

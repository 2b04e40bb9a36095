//! The built-in pricing table: USD per million tokens for common models.
//!
//! Immutable after construction and shared by every request. Prices are list prices as
//! commonly published. Rows are costed by `price_book`, which builds its snapshot from
//! this table; the agents' simulations read the table's alternatives and discounts.

/// One model's list price.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPrice {
    pub provider: &'static str,
    pub model: &'static str,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Same-provider model a request can usually be routed to when it is short and simple.
    pub cheaper_alternative: Option<&'static str>,
    /// Discount on prompt tokens served from the provider's prompt cache (0.0 – 1.0).
    pub cached_input_discount: f64,
    /// Discount of the provider's batch API (0.0 – 1.0).
    pub batch_discount: f64,
}

#[derive(Debug, Clone)]
pub struct PricingTable {
    models: Vec<ModelPrice>,
}

const fn price(
    provider: &'static str,
    model: &'static str,
    input_per_mtok: f64,
    output_per_mtok: f64,
    cheaper_alternative: Option<&'static str>,
    cached_input_discount: f64,
    batch_discount: f64,
) -> ModelPrice {
    ModelPrice {
        provider,
        model,
        input_per_mtok,
        output_per_mtok,
        cheaper_alternative,
        cached_input_discount,
        batch_discount,
    }
}

impl Default for PricingTable {
    fn default() -> Self {
        Self::builtin()
    }
}

impl PricingTable {
    pub fn builtin() -> Self {
        let models = vec![
            price(
                "openai",
                "gpt-4o",
                2.50,
                10.00,
                Some("gpt-4o-mini"),
                0.5,
                0.5,
            ),
            price("openai", "gpt-4o-mini", 0.15, 0.60, None, 0.5, 0.5),
            price(
                "openai",
                "gpt-4.1",
                2.00,
                8.00,
                Some("gpt-4.1-mini"),
                0.75,
                0.5,
            ),
            price(
                "openai",
                "gpt-4.1-mini",
                0.40,
                1.60,
                Some("gpt-4.1-nano"),
                0.75,
                0.5,
            ),
            price("openai", "gpt-4.1-nano", 0.10, 0.40, None, 0.75, 0.5),
            price(
                "openai",
                "o3-mini",
                1.10,
                4.40,
                Some("gpt-4o-mini"),
                0.5,
                0.5,
            ),
            price(
                "openai",
                "gpt-4-turbo",
                10.00,
                30.00,
                Some("gpt-4o-mini"),
                0.0,
                0.5,
            ),
            price(
                "openai",
                "gpt-3.5-turbo",
                0.50,
                1.50,
                Some("gpt-4o-mini"),
                0.0,
                0.5,
            ),
            price(
                "anthropic",
                "claude-3-5-sonnet",
                3.00,
                15.00,
                Some("claude-3-5-haiku"),
                0.9,
                0.5,
            ),
            price(
                "anthropic",
                "claude-3-7-sonnet",
                3.00,
                15.00,
                Some("claude-3-5-haiku"),
                0.9,
                0.5,
            ),
            price(
                "anthropic",
                "claude-3-5-haiku",
                0.80,
                4.00,
                Some("claude-3-haiku"),
                0.9,
                0.5,
            ),
            price("anthropic", "claude-3-haiku", 0.25, 1.25, None, 0.9, 0.5),
            price(
                "anthropic",
                "claude-3-opus",
                15.00,
                75.00,
                Some("claude-3-5-haiku"),
                0.9,
                0.5,
            ),
            price(
                "google",
                "gemini-1.5-pro",
                1.25,
                5.00,
                Some("gemini-1.5-flash"),
                0.75,
                0.5,
            ),
            price("google", "gemini-1.5-flash", 0.075, 0.30, None, 0.75, 0.5),
            price("google", "gemini-2.0-flash", 0.10, 0.40, None, 0.75, 0.5),
            price(
                "mistral",
                "mistral-large",
                2.00,
                6.00,
                Some("mistral-small"),
                0.0,
                0.0,
            ),
            price("mistral", "mistral-small", 0.20, 0.60, None, 0.0, 0.0),
            price(
                "meta",
                "llama-3.1-70b",
                0.88,
                0.88,
                Some("llama-3.1-8b"),
                0.0,
                0.0,
            ),
            price("meta", "llama-3.1-8b", 0.18, 0.18, None, 0.0, 0.0),
        ];
        Self { models }
    }

    pub fn models(&self) -> &[ModelPrice] {
        &self.models
    }

    /// Finds a model by name, ignoring case and dated suffixes ("gpt-4o-2024-08-06").
    /// The longest matching name wins, so "gpt-4o-mini" is not taken for "gpt-4o".
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        let wanted = model.trim().to_ascii_lowercase();
        self.models
            .iter()
            .filter(|p| names_model(p.model, &wanted))
            .max_by_key(|p| p.model.len())
    }

    /// List cost of one call, or `None` for a model the table does not know.
    pub fn cost(&self, model: &str, prompt_tokens: i64, completion_tokens: i64) -> Option<f64> {
        self.lookup(model)
            .map(|p| cost_at(p, prompt_tokens, completion_tokens))
    }
}

/// Whether a price for `listed` (lowercase) applies to the model a row names, `wanted`
/// (trimmed, lowercase): the same name, or the name with a dated suffix
/// ("gpt-4o-2024-08-06"). Callers prefer the longest `listed` that matches, so
/// "gpt-4o-mini" is not taken for "gpt-4o".
pub fn names_model(listed: &str, wanted: &str) -> bool {
    wanted == listed
        || wanted.strip_prefix(listed).is_some_and(|rest| {
            rest.starts_with('-') && rest[1..].starts_with(|c: char| c.is_ascii_digit())
        })
}

/// Price of a prompt token written to the cache, as a multiple of the input price:
/// Anthropic bills cache writes (five-minute cache) at 1.25×; OpenAI and Google do not
/// bill them apart.
pub fn cache_write_multiplier(price: &ModelPrice) -> f64 {
    if price.provider == "anthropic" {
        1.25
    } else {
        1.0
    }
}

pub fn cost_at(price: &ModelPrice, prompt_tokens: i64, completion_tokens: i64) -> f64 {
    (prompt_tokens as f64 * price.input_per_mtok + completion_tokens as f64 * price.output_per_mtok)
        / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_prefers_the_longest_name_and_accepts_dated_variants() {
        let table = PricingTable::builtin();
        assert_eq!(table.lookup("gpt-4o-mini").unwrap().model, "gpt-4o-mini");
        assert_eq!(table.lookup("GPT-4o-2024-08-06").unwrap().model, "gpt-4o");
        assert!(table.lookup("gpt-4omega").is_none());
        assert!(table.lookup("unknown-model").is_none());
    }

    #[test]
    fn cost_is_per_million_tokens() {
        let table = PricingTable::builtin();
        let cost = table.cost("gpt-4o", 1_000_000, 1_000_000).unwrap();
        assert!((cost - 12.5).abs() < 1e-9);
    }
}

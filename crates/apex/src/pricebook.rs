//! `apex pricebook`: the prices that cost your usage rows (the CLI side of
//! `GET /api/pricebook` and `POST /api/pricebook`), and `apex usage explain`'s printing.
//!
//! `import` reads a JSON file of negotiated rates: `{"prices": [...]}` or a bare array of
//! entries, each `{model, input_usd_per_mtok, output_usd_per_mtok}` and optionally
//! `provider`, `effective_from`, `cached_input_usd_per_mtok`, `cache_write_usd_per_mtok`,
//! `reasoning_usd_per_mtok`, `request_fee_usd`, `note`.

use anyhow::{bail, Context as _};
use apex_protocol::prices::{
    PriceBook, PriceEntry, PriceOverrideImport, PriceOverrideInput, PriceOverrideResult,
    UsageExplanation,
};

use crate::account::{describe_error, AccountArgs};
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum PricebookCommand {
    /// Add negotiated rates from a JSON file. Rows stored before keep their cost; rows
    /// stored from now on, dated from each entry's effective_from, use it.
    ///
    /// Example: APEX_PASSWORD=... apex pricebook import --email me@example.com rates.json
    ///   rates.json: {"prices": [{"model": "gpt-4o", "effective_from": "2026-01-01",
    ///                "input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0,
    ///                "cached_input_usd_per_mtok": 1.0, "note": "2026 contract"}]}
    #[command(verbatim_doc_comment)]
    Import {
        /// The JSON file.
        file: std::path::PathBuf,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List the prices that cost your rows: your rates first, then the built-in ones.
    ///
    /// Example: APEX_PASSWORD=... apex pricebook list --email me@example.com --model gpt-4o
    #[command(verbatim_doc_comment)]
    List {
        /// Only entries whose model name contains this.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        account: AccountArgs,
    },
}

pub async fn run(command: PricebookCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    match command {
        PricebookCommand::Import { file, account } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let body = parse_file(&text).with_context(|| format!("reading {}", file.display()))?;
            let token = account.authenticate().await?.access_token;
            let response = http
                .post(format!("{}/api/pricebook", account.base_url()))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("import refused: {}", describe_error(response).await);
            }
            let result: PriceOverrideResult = response.json().await?;
            println!(
                "imported {} prices from {}",
                result.imported,
                file.display()
            );
            for entry in &result.entries {
                print_entry(entry);
            }
        }
        PricebookCommand::List { model, account } => {
            let token = account.authenticate().await?.access_token;
            let response = http
                .get(format!("{}/api/pricebook", account.base_url()))
                .bearer_auth(token)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("price book refused: {}", describe_error(response).await);
            }
            let book: PriceBook = response.json().await?;
            println!("built-in snapshot {}", book.snapshot);
            let wanted = model.map(|m| m.to_ascii_lowercase());
            for entry in book
                .entries
                .iter()
                .filter(|e| wanted.as_deref().is_none_or(|w| e.model.contains(w)))
            {
                print_entry(entry);
            }
        }
    }
    Ok(())
}

/// `{"prices": [...]}`, or the array alone.
fn parse_file(text: &str) -> anyhow::Result<PriceOverrideImport> {
    let value: serde_json::Value = serde_json::from_str(text)?;
    Ok(if value.is_array() {
        PriceOverrideImport {
            prices: serde_json::from_value::<Vec<PriceOverrideInput>>(value)?,
        }
    } else {
        serde_json::from_value(value)?
    })
}

fn print_entry(e: &PriceEntry) {
    // Names and notes came from files: printed cleaned.
    println!(
        "  {:<44} {:<10} {:<24} from {:<24} in ${} cached ${} write ${} out ${} reasoning ${} /Mtok{}{}",
        clean(&e.version),
        clean(&e.provider),
        clean(&e.model),
        e.effective_from.as_deref().unwrap_or("the start"),
        e.input_usd_per_mtok,
        e.cached_input_usd_per_mtok,
        e.cache_write_usd_per_mtok,
        e.output_usd_per_mtok,
        e.reasoning_usd_per_mtok,
        if e.request_fee_usd > 0.0 {
            format!(" + ${} a request", e.request_fee_usd)
        } else {
            String::new()
        },
        e.note
            .as_deref()
            .map(|n| format!("  ({})", clean(n)))
            .unwrap_or_default()
    );
}

/// Prints `GET /api/usage/explain`'s answer: per price version, each class's
/// `quantity × rate = cost`.
pub fn print_explanation(x: &UsageExplanation) {
    if x.rows == 0 {
        println!("no rows match in this window");
        return;
    }
    if let Some(row) = &x.row {
        println!(
            "row {}: {} {} / {} ({}), {}, {} request(s)",
            row.id,
            row.timestamp,
            clean(&row.provider),
            clean(&row.model),
            clean(&row.workload),
            clean(&row.source),
            row.requests
        );
    }
    for group in &x.groups {
        match (&group.price_version, &group.price) {
            (Some(version), Some(price)) => println!(
                "{} rows costed with {} ({} {}):",
                group.rows,
                clean(version),
                clean(&price.provider),
                clean(&price.model)
            ),
            (Some(version), None) => println!(
                "{} rows costed with {} (not in this server's price book): ${:.6} as stored",
                group.rows,
                clean(version),
                group.stored_cost_usd
            ),
            (None, _) => println!(
                "{} rows with the cost their source sent: ${:.6}",
                group.rows, group.stored_cost_usd
            ),
        }
        for line in &group.lines {
            let unit = if line.class == "requests" {
                "a request"
            } else {
                "/Mtok"
            };
            println!(
                "  {:<13} {:>12} × ${} {:<9} = ${:.6}",
                line.class, line.quantity, line.rate_usd, unit, line.cost_usd
            );
        }
    }
    println!(
        "total: ${:.6} computed ({} µ$), ${:.6} stored, {} rows, {} requests",
        x.computed_cost_usd, x.computed_cost_micro_usd, x.stored_cost_usd, x.rows, x.requests
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_an_object_with_prices_or_a_bare_array() {
        let entry = r#"{"model": "gpt-4o", "input_usd_per_mtok": 2, "output_usd_per_mtok": 8}"#;
        let a = parse_file(&format!(r#"{{"prices": [{entry}]}}"#)).unwrap();
        let b = parse_file(&format!("[{entry}]")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.prices[0].input_usd_per_mtok, 2.0);
        assert!(parse_file(r#"{"prices": [{"model": "x"}]}"#).is_err());
    }
}

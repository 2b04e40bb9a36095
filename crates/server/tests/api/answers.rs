//! What a person reads: the answer states their own figures in words, follow-ups in the
//! same thread are read with the question before them, and a question about one model,
//! workload, plan step or window gets that scope's figures (template writer; the embedded
//! model's answers are checked in the `llm` target and by `apex eval`).

use apex_protocol::events::EventKind;
use apex_server::agents::answer::money;

use crate::helpers::spawn_app;

fn answer_of(run: &crate::helpers::RunTranscript) -> String {
    run.terminal().payload["final_response"]
        .as_str()
        .unwrap()
        .to_string()
}

fn triage_of(run: &crate::helpers::RunTranscript) -> serde_json::Value {
    result_of(run, "triage")
}

/// The result the run's `agent` completed with.
fn result_of(run: &crate::helpers::RunTranscript, agent: &str) -> serde_json::Value {
    run.events
        .iter()
        .find(|e| e.kind == EventKind::AgentCompleted && e.agent_name == agent)
        .unwrap_or_else(|| panic!("{agent} completed"))
        .payload["result"]
        .clone()
}

#[tokio::test]
async fn the_answer_states_the_total_the_top_model_and_every_saving() {
    let app = spawn_app().await;
    let user = app.register().await;
    let summary = app.usage_summary(&user).await;
    let mut ws = app.ws_connect(&user).await;
    let run = ws.ask("How can I reduce my LLM costs?", None).await;
    let answer = answer_of(&run);
    assert!(answer.contains(&money(summary.total_cost_usd)), "{answer}");
    assert!(answer.contains(&summary.by_model[0].model), "{answer}");
    assert!(
        answer.contains(&summary.by_workload[0].workload),
        "{answer}"
    );
    let report = &run.terminal().payload["result"];
    let recommendations = report["recommendations"].as_array().unwrap();
    assert!(!recommendations.is_empty());
    for rec in recommendations {
        let saving = money(rec["monthly_savings_usd"].as_f64().unwrap());
        assert!(answer.contains(&saving), "{saving} missing:\n{answer}");
    }
    // The summary sentence comes first, in words, then the figures.
    assert!(answer.starts_with("You spent "), "{answer}");
}

#[tokio::test]
async fn a_follow_up_about_one_model_answers_with_that_models_figure() {
    let app = spawn_app().await;
    let user = app.register().await;
    let summary = app.usage_summary(&user).await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask("How can I reduce my LLM costs?", None).await;
    // Ask about a model this user really uses (not the top one), then one they do not.
    let model = &summary.by_model.last().unwrap().model;
    let follow_up = ws
        .ask(
            &format!("And how much did I spend on {model}?"),
            Some(&first.thread_id),
        )
        .await;
    let triage = triage_of(&follow_up);
    assert_eq!(triage["follow_up"], true, "{triage}");
    assert_eq!(triage["models"][0], model.as_str(), "{triage}");
    let cost: f64 = summary
        .by_model
        .iter()
        .filter(|m| &m.model == model)
        .map(|m| m.cost_usd)
        .sum();
    let answer = answer_of(&follow_up);
    assert!(
        answer.starts_with(&format!("{model}: {} over the last 30 days", money(cost))),
        "{answer}"
    );

    // "what about last week?" keeps the model and re-runs the analysis for 7 days.
    let week = ws
        .ask("what about last week?", Some(&first.thread_id))
        .await;
    let triage = triage_of(&week);
    assert_eq!(triage["days"], 7, "{triage}");
    assert_eq!(triage["models"][0], model.as_str(), "{triage}");
    assert_eq!(week.terminal().payload["result"]["usage"]["days"], 7);
    assert!(answer_of(&week).contains("over the last 7 days"));

    let unused = ["o3-mini", "mistral-large", "llama-3.1-70b"]
        .into_iter()
        .find(|m| !summary.by_model.iter().any(|u| &u.model == m))
        .unwrap();
    let none = ws
        .ask(&format!("and {unused}?"), Some(&first.thread_id))
        .await;
    let answer = answer_of(&none);
    assert!(
        answer.contains(&format!(
            "Your data does not show any requests to the model {unused}"
        )),
        "{answer}"
    );
    assert!(
        answer.contains(&summary.by_model[0].model),
        "it says what the data shows"
    );
}

/// The `usage_summary` tool's parameters and result in `run`.
fn usage_tool_of(run: &crate::helpers::RunTranscript) -> (serde_json::Value, serde_json::Value) {
    tool_of(run, "usage_summary")
}

/// The arguments and the result of the run's call to tool `name`.
fn tool_of(
    run: &crate::helpers::RunTranscript,
    name: &str,
) -> (serde_json::Value, serde_json::Value) {
    let find = |kind: EventKind| {
        run.events
            .iter()
            .find(|e| e.kind == kind && e.payload["tool_name"] == name)
            .unwrap_or_else(|| panic!("the {name} tool ran"))
            .payload
            .clone()
    };
    (
        find(EventKind::ToolExecuting)["parameters"].clone(),
        find(EventKind::ToolCompleted)["result"].clone(),
    )
}

/// "And the week before?" analyses the seven days before the week the thread asked about,
/// not the last seven again, and the answer says which days it read.
#[tokio::test]
async fn a_follow_up_about_the_week_before_reads_the_week_before() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let last_week = ws.ask("How much did I spend last week?", None).await;
    let (parameters, last) = usage_tool_of(&last_week);
    assert_eq!(parameters, serde_json::json!({ "days": 7 }));
    assert!(answer_of(&last_week).contains("in the last 7 days"));

    let before = ws
        .ask(
            "And what about the week before?",
            Some(&last_week.thread_id),
        )
        .await;
    let triage = triage_of(&before);
    assert_eq!(
        (triage["days"].as_u64(), triage["ends_days_ago"].as_u64()),
        (Some(7), Some(7)),
        "{triage}"
    );
    let (parameters, earlier) = usage_tool_of(&before);
    assert_eq!(
        parameters,
        serde_json::json!({ "days": 7, "ends_days_ago": 7 })
    );
    // Its window starts seven days before the first one's, less the time between the two
    // runs (the second run's "now" is later; starts are written to the millisecond).
    let start = |summary: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(summary["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let shift = start(&last) - start(&earlier);
    const WEEK_MS: i64 = 7 * 86_400_000;
    assert!(
        (WEEK_MS - 120_000..=WEEK_MS).contains(&shift),
        "moved back {shift} ms"
    );
    assert_ne!(earlier["total_cost_usd"], last["total_cost_usd"]);
    let answer = answer_of(&before);
    assert!(
        answer.starts_with(&format!(
            "You spent {} in the 7 days before the last 7",
            money(earlier["total_cost_usd"].as_f64().unwrap())
        )),
        "{answer}"
    );
    assert!(!answer.contains("the last 7 days"), "{answer}");
}

/// The savings of a follow-up about an earlier period are simulated on that period alone,
/// not on it and every day since: the month before the user's month of usage has no
/// traffic, so there is nothing to save in it.
#[tokio::test]
async fn savings_for_an_earlier_period_are_simulated_on_that_period_only() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let month = ws.ask("How can I reduce my LLM costs?", None).await;
    let (_, found) = tool_of(&month, "savings_simulator");
    assert!(!found.as_array().unwrap().is_empty(), "{found}");

    let before = ws
        .ask("And what about the month before?", Some(&month.thread_id))
        .await;
    let (parameters, found) = tool_of(&before, "savings_simulator");
    assert_eq!(parameters["ends_days_ago"], 30, "{parameters}");
    let (_, usage) = usage_tool_of(&before);
    assert_eq!(usage["total_requests"], 0, "{usage}");
    let total: f64 = found
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["monthly_savings_usd"].as_f64().unwrap())
        .sum();
    assert_eq!(
        total, 0.0,
        "savings found in a period without usage: {found}"
    );
    // Nothing to save is $0.00, not "$-0.00" (an empty float sum is -0.0).
    let saved = result_of(&before, "optimization")["monthly_savings_usd"]
        .as_f64()
        .unwrap();
    assert!(saved == 0.0 && saved.is_sign_positive(), "{saved}");
    for event in &before.events {
        let text = serde_json::to_string(&event.payload).unwrap();
        assert!(!text.contains("$-"), "{text}");
    }
}

#[tokio::test]
async fn explain_step_two_refers_to_the_previous_plan() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask("How can I reduce my LLM costs?", None).await;
    let plan = first.terminal().payload["result"]["action_plan"].clone();
    let step = ws.ask("explain step 2", Some(&first.thread_id)).await;
    let answer = answer_of(&step);
    let title = plan[1]["title"].as_str().unwrap();
    assert!(
        answer.starts_with(&format!("Step 2 of your plan: {title}")),
        "{answer}"
    );
    assert_eq!(triage_of(&step)["category"], "cost_optimization");
    // A new thread knows nothing of the earlier one.
    let fresh = ws.ask("explain step 2", None).await;
    assert_eq!(triage_of(&fresh)["follow_up"], false);
}

/// "What should I do first?" after a savings answer continues that thread: its first step,
/// not the generic "what I can answer" that a new topicless question gets; "how much will
/// that save?" stays on it; "and after that?" then gets the second.
#[tokio::test]
async fn what_to_do_first_and_after_that_walk_the_thread_plan() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask("how can I cut my LLM costs?", None).await;
    let plan = first.terminal().payload["result"]["action_plan"].clone();
    let next = ws
        .ask("what should I do first?", Some(&first.thread_id))
        .await;
    let answer = answer_of(&next);
    let title = plan[0]["title"].as_str().unwrap();
    assert!(
        answer.starts_with(&format!("Step 1 of your plan: {title}")),
        "{answer}"
    );
    assert_eq!(triage_of(&next)["follow_up"], true);
    assert_eq!(triage_of(&next)["category"], "cost_optimization");
    // "That" is the step just discussed.
    let that = ws
        .ask("how much will that save?", Some(&first.thread_id))
        .await;
    let answer = answer_of(&that);
    assert!(
        answer.starts_with(&format!("Step 1 of your plan: {title}")),
        "{answer}"
    );
    // And the ones after it, to the end of the plan: long answers leave the first
    // questions outside what a run reads of its thread, so each step follows the last
    // answer's.
    let steps = plan.as_array().unwrap();
    for (index, step) in steps.iter().enumerate().skip(1) {
        let question = if index % 2 == 1 {
            "and after that?"
        } else {
            "what next?"
        };
        let run = ws.ask(question, Some(&first.thread_id)).await;
        let answer = answer_of(&run);
        let title = step["title"].as_str().unwrap();
        assert!(
            answer.starts_with(&format!("Step {} of your plan: {title}", index + 1)),
            "{question} → {answer}"
        );
    }
    let past = ws.ask("what next?", Some(&first.thread_id)).await;
    let answer = answer_of(&past);
    assert!(
        answer.starts_with(&format!(
            "Your plan has {} steps, so there is no step {}",
            steps.len(),
            steps.len() + 1
        )),
        "{answer}"
    );
}

#[tokio::test]
async fn an_off_topic_question_gets_an_honest_scope_not_a_cost_report() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run = ws.ask("what is the capital of France?", None).await;
    let answer = answer_of(&run);
    assert!(
        answer.starts_with("I can answer questions about your own AI usage"),
        "{answer}"
    );
    assert!(!answer.contains("You could save"), "{answer}");
    assert_eq!(triage_of(&run)["category"], "general");
}

#!/usr/bin/env bash
# The README's test command: the whole workspace suite under cargo-nextest.
#
# Some tests need a service or a tool: PostgreSQL, Redis, Chromium with Node.js, the local
# model file, Python packages. A test never skips itself (libtest would count an early
# return as a pass, so a suite that ran nothing would look green); one that runs without
# its prerequisite fails. Instead this script checks each prerequisite first and leaves out
# exactly the tests that need a missing one, with a filterset, so nextest's own summary
# counts them as skipped, and prints one line per left-out suite saying what is missing and
# what to install or set. Under CI (CI set, and not "false" or "0") nothing may be left
# out: a missing prerequisite fails the script before anything is built.
#
# Arguments go to `cargo nextest run` unchanged (e.g. --no-fail-fast, a test-name
# substring); a filterset given with -E/--filterset is combined with the exclusions.
#
# What is looked at (each may be set in the environment):
#   APEX_TEST_POSTGRES_URL  PostgreSQL for api_postgres, the CLI's PostgreSQL test and
#                           multi_instance (e.g. postgres://postgres@127.0.0.1:5432/test)
#   APEX_TEST_REDIS_URL     Redis for multi_instance (e.g. redis://127.0.0.1:6379)
#   APEX_CHROMIUM           the browser test's Chromium (default /usr/bin/chromium, else
#                           `chromium` on PATH); APEX_CHROMIUM=/nonexistent shows what a
#                           machine without Chromium runs
#   APEX_TEST_MODEL         the local model file (default: the per-machine cache
#                           ${XDG_CACHE_HOME:-$HOME/.cache}/apex/models/, else data/models/)
set -euo pipefail
cd "$(dirname "$0")/.."

readonly MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf

in_ci() {
    [ -n "${CI:-}" ] && [ "$CI" != false ] && [ "$CI" != 0 ]
}

# Left-out suites in order of first mention; for each, its filterset and what it lacks.
suites=()
declare -A suite_filter=() suite_missing=()

# leave_out SUITE FILTERSET REASON: SUITE (a name for people) needs what REASON describes.
leave_out() {
    local suite=$1 filter=$2 reason=$3
    if [ -z "${suite_filter[$suite]+set}" ]; then
        suites+=("$suite")
        suite_filter[$suite]=$filter
        suite_missing[$suite]=$reason
    else
        suite_missing[$suite]+="; $reason"
    fi
}

# The filterset of every test in a test binary. A bare binary_id() would leave the binary
# out of the run as a whole, and nextest then counts none of its tests as skipped ("1
# binary skipped"); with a test() term it has to list the binary's tests, and each left-out
# test is counted.
whole_binary() {
    printf 'binary_id(%s) & test(/./)' "$1"
}

# A URL as printed: a password in it is masked.
shown() {
    printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'
}

# host and port of a URL (credentials, path and query dropped), as "HOST PORT".
host_port() {
    local url=$1 default_port=$2 address
    address=$(printf '%s' "$url" | sed -E 's#^[a-z+]+://##; s#^[^@/]*@##; s#[/?].*$##')
    if [[ $address =~ ^\[(.*)\](:([0-9]+))?$ ]]; then
        printf '%s %s' "${BASH_REMATCH[1]}" "${BASH_REMATCH[3]:-$default_port}"
    elif [[ $address == *:* ]]; then
        printf '%s %s' "${address%:*}" "${address##*:}"
    else
        printf '%s %s' "${address:-127.0.0.1}" "$default_port"
    fi
}

# --- PostgreSQL -------------------------------------------------------------------------
# Test names are the module paths inside each binary: api_postgres includes the api tests
# as a module named `api`, so a name may start with `api::` there.
postgres_missing=""
postgres_example="APEX_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test"
if [ -z "${APEX_TEST_POSTGRES_URL:-}" ]; then
    postgres_missing="PostgreSQL: APEX_TEST_POSTGRES_URL is not set (set it, e.g. $postgres_example)"
else
    pg_url=$APEX_TEST_POSTGRES_URL
    if command -v psql >/dev/null; then
        # psql refuses sqlx's own query parameters (options[search_path]=...): the probe
        # only needs the server, the user and the database, so the query is dropped.
        if ! pg_error=$(PGCONNECT_TIMEOUT=5 psql "${pg_url%%\?*}" -qAt -c 'select 1' 2>&1 >/dev/null); then
            postgres_missing="PostgreSQL does not answer at APEX_TEST_POSTGRES_URL=$(shown "$pg_url") ($(printf '%s' "$pg_error" | head -n 1)); start it or correct the URL"
        fi
    else
        # Without psql, a TCP connection to the server's port is the best cheap check.
        read -r pg_host pg_port <<<"$(host_port "$pg_url" 5432)"
        if ! timeout 5 bash -c "exec 3<>/dev/tcp/$pg_host/$pg_port" 2>/dev/null; then
            postgres_missing="PostgreSQL does not answer at $pg_host:$pg_port (APEX_TEST_POSTGRES_URL); start it or correct the URL"
        fi
    fi
fi
if [ -n "$postgres_missing" ]; then
    # no_global_state scans the source tree and needs no database: it runs on.
    leave_out "api_postgres (the integration tests on PostgreSQL)" \
        'binary_id(apex-server::api_postgres) & not test(/^api::no_global_state::/)' "$postgres_missing"
    leave_out "apex::cli migrate_then_serve_and_chat_on_postgres" \
        'binary_id(apex::cli) & test(=migrate_then_serve_and_chat_on_postgres)' "$postgres_missing"
    leave_out "apex::multi_instance (several apex serve processes)" \
        "$(whole_binary apex::multi_instance)" "$postgres_missing"
fi

# --- Redis ------------------------------------------------------------------------------
if [ -z "${APEX_TEST_REDIS_URL:-}" ]; then
    leave_out "apex::multi_instance (several apex serve processes)" \
        "$(whole_binary apex::multi_instance)" \
        "Redis: APEX_TEST_REDIS_URL is not set (set it, e.g. APEX_TEST_REDIS_URL=redis://127.0.0.1:6379)"
    leave_out "the Redis bus attack test (hostile_hygiene::redis_*)" \
        'test(/hostile_hygiene::redis_/)' \
        "Redis: APEX_TEST_REDIS_URL is not set (set it, e.g. APEX_TEST_REDIS_URL=redis://127.0.0.1:6379)"
else
    read -r redis_host redis_port <<<"$(host_port "$APEX_TEST_REDIS_URL" 6379)"
    redis_reply=$(timeout 5 bash -c "exec 3<>/dev/tcp/$redis_host/$redis_port && printf 'PING\r\n' >&3 && head -c 7 <&3" 2>/dev/null || true)
    case "$redis_reply" in
        # A server that wants a password answers NOAUTH: it is there, the URL has the rest.
        +PONG* | -NOAUTH*) ;;
        *)
            leave_out "apex::multi_instance (several apex serve processes)" \
                "$(whole_binary apex::multi_instance)" \
                "Redis does not answer PING at $redis_host:$redis_port (APEX_TEST_REDIS_URL); start it or correct the URL"
            leave_out "the Redis bus attack test (hostile_hygiene::redis_*)" \
                'test(/hostile_hygiene::redis_/)' \
                "Redis does not answer PING at $redis_host:$redis_port (APEX_TEST_REDIS_URL); start it or correct the URL"
            ;;
    esac
fi

# --- the browser test -------------------------------------------------------------------
# crates/apex/tests/browser.rs uses APEX_CHROMIUM, else /usr/bin/chromium; a Chromium found
# elsewhere on PATH is handed to it through APEX_CHROMIUM.
if [ -z "${APEX_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ] && command -v chromium >/dev/null; then
    APEX_CHROMIUM=$(command -v chromium)
    export APEX_CHROMIUM
fi
chromium=${APEX_CHROMIUM:-/usr/bin/chromium}
browser_missing=()
[ -x "$chromium" ] || browser_missing+=("Chromium at $chromium (apt-get install chromium, or set APEX_CHROMIUM)")
command -v node >/dev/null || browser_missing+=("node (apt-get install nodejs npm)")
[ -f tests/browser/node_modules/playwright-core/package.json ] ||
    browser_missing+=("tests/browser/node_modules (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci)")
if [ ${#browser_missing[@]} -gt 0 ]; then
    joined=$(printf '%s, ' "${browser_missing[@]}")
    leave_out "apex::browser (the web page in a real browser)" "$(whole_binary apex::browser)" \
        "missing: ${joined%, }"
fi

# --- the local model --------------------------------------------------------------------
# The order crates/server/tests/api/helpers.rs::model_path() looks in: APEX_TEST_MODEL
# alone when set, else the per-machine cache, else the repository's data folder.
if [ -n "${APEX_TEST_MODEL:-}" ]; then
    model_candidates=("$APEX_TEST_MODEL")
else
    model_candidates=()
    cache_root=${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}
    [ -n "$cache_root" ] && model_candidates+=("$cache_root/apex/models/$MODEL_FILE")
    model_candidates+=("$PWD/data/models/$MODEL_FILE")
fi
model_found=""
for candidate in "${model_candidates[@]}"; do
    if [ -f "$candidate" ]; then
        model_found=$candidate
        break
    fi
done
if [ -z "$model_found" ]; then
    joined=$(printf '%s, ' "${model_candidates[@]}")
    leave_out "the local-model tests (llm local_model::*, openai_api::*; api and api_postgres hostile_fairness::local_model_*)" \
        '(binary_id(apex-server::llm) & (test(/^local_model::/) | test(/^openai_api::/))) | test(/^(api::)?hostile_fairness::local_model_/)' \
        "the local model is missing (looked for ${joined%, }); run scripts/fetch-model.sh or set APEX_TEST_MODEL to the file"
fi

# --- Python packages --------------------------------------------------------------------
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
    leave_out "openapi::openapi_json_passes_openapi_spec_validator (api, api_postgres)" \
        'test(/^(api::)?openapi::openapi_json_passes_openapi_spec_validator$/)' \
        "Python's openapi-spec-validator is not installed (pip install openapi-spec-validator)"
fi
if ! python3 -c 'import openai' 2>/dev/null; then
    leave_out "the official openai client's tests (api and api_postgres openai_compat and gateway, llm openai_api)" \
        'test(/^(api::)?openai_compat::the_openai_package_gets_pipeline_answers_about_the_users_own_data$/) | test(/^(api::)?gateway::the_official_openai_client_through_the_gateway_is_counted_streamed_and_not$/) | (binary_id(apex-server::llm) & test(=openai_api::the_openai_package_talks_to_the_local_model))' \
        "Python's openai package is not installed (pip install openai)"
fi

if ! python3 -c 'import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
    leave_out "the official OpenTelemetry exporter's test (api and api_postgres usage_sources)" \
        'test(/^(api::)?usage_sources::the_official_python_exporter_sends_spans_that_are_stored_once$/)' \
        "Python's opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http are not installed (pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http)"
fi

# --- report, and refuse under CI ------------------------------------------------------------
if [ ${#suites[@]} -gt 0 ]; then
    if in_ci; then
        for suite in "${suites[@]}"; do
            echo "ERROR: CI must run $suite, but ${suite_missing[$suite]}" >&2
        done
        exit 1
    fi
    for suite in "${suites[@]}"; do
        echo "skipped: $suite: ${suite_missing[$suite]}"
    done
fi

# --- run ------------------------------------------------------------------------------------
# Several -E filtersets are a union to nextest, so a caller's filterset is taken out of the
# arguments and intersected with the exclusions instead of widening them.
user_filters=()
passed=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) passed+=("$@"); break ;;
        -E | --filterset | --filter-expr) user_filters+=("$2"); shift 2 ;;
        --filterset=* | --filter-expr=*) user_filters+=("${1#*=}"); shift ;;
        -E?*) user_filters+=("${1#-E}"); shift ;;
        *) passed+=("$1"); shift ;;
    esac
done
filter=""
if [ ${#user_filters[@]} -gt 0 ]; then
    filter="($(printf '(%s) | ' "${user_filters[@]}" | sed 's/ | $//'))"
fi
if [ ${#suites[@]} -gt 0 ]; then
    excluded=$(for suite in "${suites[@]}"; do printf '(%s) | ' "${suite_filter[$suite]}"; done | sed 's/ | $//')
    filter="${filter:+$filter & }not ($excluded)"
fi
if [ -n "$filter" ]; then
    # Printed so that `cargo nextest list --workspace -E '...'` can show what runs.
    echo "filterset: $filter"
    exec cargo nextest run --workspace -E "$filter" "${passed[@]}"
fi
exec cargo nextest run --workspace "${passed[@]}"

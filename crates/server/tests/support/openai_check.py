"""Drives Apex's OpenAI-compatible API with the official `openai` package, as a user's
existing code would, and prints what it saw as one JSON object for the Rust test to check.

Usage: python3 openai_check.py BASE_URL TOKEN MODEL QUESTION
"""

import json
import sys

import openai


def main() -> None:
    base_url, token, model, question = sys.argv[1:5]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=120)
    out = {"models": [m.id for m in client.models.list().data]}

    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=48
    )
    out["completion"] = {
        "id": completion.id,
        "text": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "prompt_tokens": completion.usage.prompt_tokens if completion.usage else None,
        "completion_tokens": completion.usage.completion_tokens if completion.usage else None,
    }

    pieces = []
    finish = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=48,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta.content
            if delta:
                pieces.append(delta)
            finish = chunk.choices[0].finish_reason or finish
    out["stream"] = {"chunks": len(pieces), "text": "".join(pieces), "finish_reason": finish}

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        out["unknown_model"] = "accepted"
    except openai.NotFoundError as err:
        out["unknown_model"] = {"status": err.status_code, "message": str(err)}

    stranger = openai.OpenAI(base_url=base_url + "/v1", api_key="not-a-token", max_retries=0)
    try:
        stranger.models.list()
        out["bad_token"] = "accepted"
    except openai.AuthenticationError as err:
        out["bad_token"] = {"status": err.status_code}

    print(json.dumps(out))


if __name__ == "__main__":
    main()

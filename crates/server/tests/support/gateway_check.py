"""Calls Apex's LLM gateway with the official `openai` package, as an application's existing
code would (its base URL pointed at Apex's /v1, an Apex API key as its api_key), once
without streaming and once streaming, and prints what came back as one JSON object.

Usage: python3 gateway_check.py BASE_URL API_KEY
"""

import json
import sys

import openai


def main() -> None:
    base_url, key = sys.argv[1:3]
    client = openai.OpenAI(
        base_url=base_url + "/v1",
        api_key=key,
        max_retries=0,
        timeout=60,
        default_headers={"X-Apex-Workload": "support-bot"},
    )
    messages = [{"role": "user", "content": "Hi"}]
    completion = client.chat.completions.create(model="gpt-4o", messages=messages)
    pieces = []
    for chunk in client.chat.completions.create(model="gpt-4o", messages=messages, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    print(json.dumps({"completion": completion.choices[0].message.content, "streamed": "".join(pieces)}))


if __name__ == "__main__":
    main()

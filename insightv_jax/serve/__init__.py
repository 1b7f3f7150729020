"""`insightv serve`: our agents behind an OpenAI-compatible HTTP API.

api.py        the HTTP server: routes, API key, body limits, JSON errors, SSE
protocol.py   the chat-completions wire format: request validation, replies
images.py     `image_url` parts: data URLs, files under an allowed root
models.py     what a model name serves: one agent, or the two-agent system
scheduler.py  continuous batching over one agent's sampler
text.py       generated tokens -> the reply text (stop strings, stream deltas)
bench.py      `insightv bench serve`: concurrent vs sequential throughput
"""

"""Notifications to people: a webhook when a candidate awaits approval (``notify.webhooks``).

Modules: ``message`` (the generic and Slack-compatible JSON bodies), ``component`` (the serve
component: subscribes to ``CandidateEvaluated``, posts on a background thread; public).
"""

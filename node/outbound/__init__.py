"""Outbound delivery: routing, the SMTP client, the queue runner, DSNs, DKIM, TLS policy."""

"""postroom node: one gevent process serving SMTP, IMAP and POP3."""

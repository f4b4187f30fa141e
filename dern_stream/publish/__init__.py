"""What follows a finished rewrite: verify, the model card, the report, the Hub push."""

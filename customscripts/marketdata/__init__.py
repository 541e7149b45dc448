"""Market data: real sample OHLCV (from the `backtesting` package), derived metrics, and a NATS replayer."""

"""Kafka I/O: the news.raw contract, the scorer service, topic admin and the local broker."""

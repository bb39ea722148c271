"""A Flask app and a RabbitMQ consumer in one greenqueue process."""

"""Remote function runners: AWS Lambda (and LocalStack, moto) and plain HTTP endpoints."""

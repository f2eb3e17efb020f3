"""CloudFormation templates for AWS (MSK, Managed Flink, OpenSearch Service, SES, ECS) and their generator."""

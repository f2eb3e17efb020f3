"""OpenSearch Dashboards saved objects (checkout-guard.ndjson) and the module that writes them."""

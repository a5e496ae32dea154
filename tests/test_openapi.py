"""OpenAPI says what the API does: the bearer scheme on every authenticated operation, and the
error body (not FastAPI's default) for every error status the API answers."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.app import create_app
from services.error_schemas import ErrorResponse
from tests.conftest import Store, auth

PUBLIC = {("/healthz", "get")}


def test_every_operation_documents_auth_and_the_error_body(sqlite_store: Store) -> None:
    spec = create_app(sqlite_store.settings).openapi()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    operations = [
        (path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
    ]
    assert len(operations) > 20
    for path, method, op in operations:
        for status in ("401", "404", "409", "422", "503"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, method, status)
        if (path, method) not in PUBLIC:
            assert op.get("security") == [{"apiKey": []}], (path, method)


def test_real_error_bodies_match_the_documented_schema(sqlite_store: Store) -> None:
    with TestClient(create_app(sqlite_store.settings)) as client:
        _, key = sqlite_store.business_key()
        bodies = [
            client.post("/v1/conversations", json={"metadata": 3}, headers=auth(key)),  # 422
            client.get("/v1/conversations/nope", headers=auth(key)),  # 404
            client.get("/v1/iterations", headers=auth(key)),  # 403
            client.get("/v1/conversations/x"),  # 401
        ]
    assert [r.status_code for r in bodies] == [422, 404, 403, 401]
    for response in bodies:
        ErrorResponse.model_validate(response.json())

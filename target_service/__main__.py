import specdec.process_env  # noqa: F401  (first: before torch loads)
from specdec.serving.model_service import main
from target_service.servicer import SERVICE_NAME, TargetServicer, add_to_server

raise SystemExit(
    main("target", TargetServicer, add_to_server, SERVICE_NAME, default_dtype="float32", default_port=50053)
)

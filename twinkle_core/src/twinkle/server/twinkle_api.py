"""Placeholder router replaced below."""

from fastapi import APIRouter

router = APIRouter(prefix="/twinkle/v1", tags=["twinkle"])

"""A Django 3.2 project shaped like the AfterTrip backend, for running the docs' snippets.

The models are unmanaged copies of the backend's (`accounts_user` with its varchar id,
`accounts_group`, `accounts_usergroup`, `trips_trip`, `photos_photo` with its `tag_face`
links, `photos_tagface`) on the backend's real tables; `base.permissions.GroupMembersOnly` is
the backend's permission class; REST_FRAMEWORK is its setting (IsAuthenticated, simplejwt's
JWTAuthentication); USE_TZ = False, TIME_ZONE = 'Asia/Seoul'. What the docs say to add (the
views, the URL line) is written in from the docs themselves by the test.
"""

from __future__ import annotations

from pathlib import Path

SETTINGS = """
import os
import pymysql

pymysql.install_as_MySQLdb()

SECRET_KEY = "test-only-not-a-secret-0123456789abcdef"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "project_urls"
INSTALLED_APPS = [
    "django.contrib.contenttypes", "django.contrib.auth", "rest_framework",
    "accounts", "trips", "photos",
]
MIDDLEWARE = []
AUTH_USER_MODEL = "accounts.User"
USE_TZ = False
TIME_ZONE = "Asia/Seoul"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": {
    "ENGINE": "django.db.backends.mysql", "NAME": os.environ["DB_NAME"], "USER": "root",
    "HOST": "127.0.0.1", "PORT": os.environ["DB_PORT"], "OPTIONS": {"charset": "utf8mb4"},
}}
REST_FRAMEWORK = {
    "DEFAULT_PERMISSION_CLASSES": ("rest_framework.permissions.IsAuthenticated",),
    "DEFAULT_AUTHENTICATION_CLASSES": (
        "rest_framework_simplejwt.authentication.JWTAuthentication",
    ),
}
AFTERTRIP_BROKER_URL = os.environ["BROKER"]
"""

ACCOUNTS_MODELS = """
from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.db import models


class User(AbstractBaseUser):
    id = models.CharField(max_length=25, primary_key=True)
    name = models.CharField(max_length=20)
    email = models.CharField(max_length=255, unique=True)
    is_active = models.BooleanField(default=True)
    is_admin = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True)
    USERNAME_FIELD = "id"
    objects = BaseUserManager()

    class Meta:
        managed = False
        db_table = "accounts_user"


class Group(models.Model):
    name = models.CharField(max_length=20)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "accounts_group"


class UserGroup(models.Model):
    user = models.ForeignKey(User, on_delete=models.CASCADE)
    group = models.ForeignKey(Group, on_delete=models.CASCADE)
    is_confirmed = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "accounts_usergroup"
"""

TRIPS_MODELS = """
from django.db import models

from accounts.models import Group


class Trip(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE)
    place = models.CharField(max_length=50)
    departing_date = models.DateField()
    arriving_date = models.DateField()
    thumbnail = models.TextField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "trips_trip"
"""

PHOTOS_MODELS = """
from django.db import models

from trips.models import Trip


class TagFace(models.Model):
    tag_num = models.IntegerField()
    custom_name = models.CharField(max_length=255)

    class Meta:
        managed = False
        db_table = "photos_tagface"


class Photo(models.Model):
    trip = models.ForeignKey(Trip, on_delete=models.CASCADE)
    file_key = models.CharField(max_length=32)
    file_name = models.CharField(max_length=255)
    url = models.TextField()
    taken_at = models.DateTimeField(null=True)
    is_sorted_yolo = models.BooleanField(default=False)
    tag_face = models.ManyToManyField(TagFace, db_table="photos_photo_tag_face")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "photos_photo"
"""

# The backend's base/permissions.py.
PERMISSIONS = """
from rest_framework.permissions import BasePermission
from rest_framework.exceptions import PermissionDenied, NotAuthenticated
from django.shortcuts import get_object_or_404
from accounts.models import Group


class GroupMembersOnly(BasePermission):

    def has_permission(self, request, view):
        if request.user.is_authenticated:
            return True
        return False

    def has_object_permission(self, request, view, obj):
        if request.user.is_authenticated:
            user_groups = Group.objects.filter(usergroup__user_id=request.user.id,
                                               usergroup__is_confirmed=True)
            trip_group = get_object_or_404(Group, id=obj.group_id)
            if trip_group in user_groups:
                return True
            raise PermissionDenied()
        raise NotAuthenticated()
"""

PROJECT_URLS = """
from django.urls import include, path

urlpatterns = [path("photos/", include("photos.urls"))]
"""


def write_project(root: Path, *, views: str, url_lines: list[str]) -> None:
    """The project under `root`: `views` is photos/views/photo_views/photo_face_views.py,
    `url_lines` the entries of photos/urls.py's urlpatterns."""
    files = {
        "demo_settings.py": SETTINGS,
        "project_urls.py": PROJECT_URLS,
        "accounts/__init__.py": "",
        "accounts/models.py": ACCOUNTS_MODELS,
        "trips/__init__.py": "",
        "trips/models.py": TRIPS_MODELS,
        "photos/__init__.py": "",
        "photos/models.py": PHOTOS_MODELS,
        "photos/views/__init__.py": "",
        "photos/views/photo_views/__init__.py": "from .photo_face_views import *  # noqa\n",
        "photos/views/photo_views/photo_face_views.py": views,
        "photos/urls.py": (
            "from django.urls import path\nfrom .views import photo_views\n\nurlpatterns = [\n"
            + "".join(f"    {line}\n" for line in url_lines)
            + "]\n"
        ),
        "base/__init__.py": "",
        "base/permissions.py": PERMISSIONS,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.json;
public class JSONArray {
  public int length() { return 0; }
  public JSONObject getJSONObject(int index) { return null; }
}
